"""Learning-rate / chunk-size sweep behind the demo defaults (results: docs/results/demo_lr_sweep.json).

lm_head-only adapters on SmolLM2-135M-Instruct; the frozen trunk's final hidden states are computed once
(cached in /tmp/H.pt) and the adapted lm_head is trained on them -- the same losses as full forwards
because only lm_head is adapted and there is no dropout. Run: PEFT_QPA_CACHE=... python benchmarks/demo_lr_sweep.py
"""
import time, torch, json, sys, random, math
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import peft_qpa
from peft_qpa import assets
from peft_qpa.evaluation import tokenize_and_group
from peft_qpa.demo import evenly_spaced_windows, lr_at
from peft import get_peft_model, LoraConfig
import torch.nn.functional as F
torch.manual_seed(0)
L = assets.load_model_and_tokenizer(None, progress=False)
m, tok = L.model, L.tokenizer
split = assets.split_plays(assets.fetch_shakespeare(progress=False))
train_blocks = tokenize_and_group(tok, assets.read_texts(split.train_files), 128)
rng = random.Random(0); order = list(range(len(train_blocks))); rng.shuffle(order)
STEPS, BS = 60, 4
tr = torch.tensor([train_blocks[i] for i in order[:STEPS*BS]])
es = tokenize_and_group(tok, assets.read_texts(split.eval_files), 10**12, drop_last=False)[0]
ev = torch.tensor(evenly_spaced_windows(es, 256, 4096))
import os
t=time.time()
if os.path.exists("/tmp/H.pt"):
    H, HE = torch.load("/tmp/H.pt")
else:
  with torch.no_grad():
    m.eval()
    H = torch.cat([m.model(input_ids=tr[i:i+8]).last_hidden_state for i in range(0, len(tr), 8)])
    HE = torch.cat([m.model(input_ids=ev[i:i+8]).last_hidden_state for i in range(0, len(ev), 8)])
  torch.save((H, HE), "/tmp/H.pt")
print("cache", time.time()-t, flush=True)
def nll(head, h, y):
    lg = head(h)[:, :-1]; return F.cross_entropy(lg.reshape(-1, lg.size(-1)), y[:, 1:].reshape(-1))
with torch.no_grad(): print("base eval nll", float(nll(m.lm_head, HE, ev)), math.exp(float(nll(m.lm_head, HE, ev))))
import copy
res = []
RUNS = [("qpa", 64, lr) for lr in (1e-3, 3e-3, 1e-2, 3e-2)] + [("lora", None, lr) for lr in (1e-3, 3e-3)] + [
    ("qpa", 256, 1e-2), ("qpa", 1024, 1e-2), ("qpa", 256, 3e-2)]
for method, cs, lr in RUNS:
    if True:
        mm = copy.deepcopy(m)
        cfg = peft_qpa.QPAConfig(r=4, lora_alpha=8, target_modules=["lm_head"], chunk_size=cs, seed=0) if method=="qpa" else LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"])
        pm = get_peft_model(mm, cfg); head = pm.base_model.model.lm_head
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        t=time.time(); losses=[]
        for s in range(STEPS):
            for g in opt.param_groups: g["lr"] = lr_at(s, lr, 5, STEPS)
            g = pm.base_model.get_generator("default") if method == "qpa" else None
            if g is not None: g.begin_forward()
            loss = nll(head, H[s*BS:(s+1)*BS], tr[s*BS:(s+1)*BS]); loss.backward()

            torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); opt.zero_grad(); losses.append(loss.item())
        pm.eval()
        if method == "qpa": g.begin_forward()
        with torch.no_grad(): e = float(sum(nll(head, HE[i:i+4], ev[i:i+4]) for i in range(0, len(ev), 4)) / (len(ev)/4))
        r = dict(method=method, cs=cs, ntrain=sum(p.numel() for p in params), lr=lr, eval_ppl=math.exp(e), first=sum(losses[:10])/10, last=sum(losses[-10:])/10, sec=time.time()-t)
        print(r, flush=True); res.append(r)
json.dump(res, open("/tmp/tune.json","w"))
