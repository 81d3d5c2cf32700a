"""Saving an adapter so that a reader sees the previous adapter or the new one, never a mix.

``PeftModel.save_pretrained`` writes the weights, then the config, then the model card, straight into the target
directory: a save interrupted in between leaves new weights beside the old config. For models with a QPA adapter,
the adapter is written into a temporary directory beside the target and published when complete
(:func:`save_staged`; ``import peft_qpa`` installs it on ``PeftModel.save_pretrained``, see ``peft_qpa.patches``).

A save owns only the files of the adapters it writes (``adapter_model.*``, ``adapter_config.json`` and
``README.md`` in the folder of each adapter it saves: the target for ``default``, ``<target>/<name>`` for the
others). Everything else in the target survives: the other adapters' folders (``selected_adapters``), a Trainer
checkpoint's files, your own files.

* Target absent, or holding only files the save owns: the finished directory replaces it by two renames (old one
  aside, new one in place; the old one is then removed). A reader sees the old directory, the new one, or (for
  the instant between the renames) none; never a mix.
* Target holding anything else: that is left alone and each new file is moved in by an atomic rename, the configs
  last. A crash between two renames can still pair new weights with the old config; loading then cross-checks the
  generator against its snapshot and warns if they disagree.

Either way an adapter keeps one weights file: saving with ``safe_serialization=False`` over a ``.safetensors``
file removes that file (and the reverse), where plain PEFT keeps both and then loads the stale ``.safetensors``.
Existing model cards (``README.md``) are copied into the temporary directory first, so a card is updated as PEFT
updates it, not replaced; the cards of adapters the save does not write stay as they are.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_config.json", "README.md")
WEIGHTS_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # one adapter's weights: one format or the other
CONFIG_NAME = "adapter_config.json"
CARD_NAME = "README.md"


def _written_directories(staging: Path) -> set[Path]:
    """The directories (relative to ``staging``) of the adapters the save wrote: those holding a new config."""
    return {config.parent.relative_to(staging) for config in staging.rglob(CONFIG_NAME) if config.is_file()}


def _owned(target: Path, entry: Path, written: set[Path]) -> bool:
    """Whether ``entry`` (under ``target``) belongs to an adapter the save rewrites: an adapter file of a written
    adapter's directory, or a directory holding only such files. Anything else (another adapter's folder, a
    checkpoint's files, your own files, an empty folder) is not the save's to replace."""
    if entry.is_symlink():
        return False
    if entry.is_file():
        return entry.name in ADAPTER_FILES and entry.parent.relative_to(target) in written
    if entry.is_dir():
        children = list(entry.iterdir())
        return bool(children) and all(_owned(target, child, written) for child in children)
    return False


def _carry_model_cards(target: Path, staging: Path) -> list[Path]:
    """Copy the existing model cards into the staging directory, so that saving updates them; returns the copies."""
    carried = []
    for card in [target / CARD_NAME, *target.glob(f"*/{CARD_NAME}")]:
        if card.is_file() and not card.is_symlink():
            destination = staging / card.relative_to(target)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(card, destination)
            carried.append(destination)
    return carried


def _drop_unused_cards(staging: Path, carried: list[Path]) -> None:
    """Remove the carried cards of adapters this save did not write (and the folders they alone made): they are
    the old files, which stay where they are, not part of what is published."""
    written = _written_directories(staging)
    for card in carried:
        folder = card.parent.relative_to(staging)
        if folder in written or not card.exists():
            continue
        card.unlink()
        if folder != Path(".") and not any(card.parent.iterdir()):
            card.parent.rmdir()


def _move_files_in(staging: Path, target: Path) -> None:
    """Move every file of ``staging`` to the same place under ``target`` by atomic renames, configs last. Once an
    adapter's new weights are in place, its weights file of the other format (a ``.bin`` beside a new
    ``.safetensors``, or the reverse) is removed: PEFT would otherwise load the stale one first."""
    files = sorted((p for p in staging.rglob("*") if p.is_file()), key=lambda p: (p.name == CONFIG_NAME, str(p)))
    new = {path.relative_to(staging) for path in files}
    for path in files:
        relative = path.relative_to(staging)
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, destination)
        if path.name in WEIGHTS_FILES:
            for other in WEIGHTS_FILES:
                stale = destination.with_name(other)
                if relative.with_name(other) not in new and stale.is_file() and not stale.is_symlink():
                    stale.unlink()


def _publish(staging: Path, target: Path) -> None:
    if not target.exists():
        os.rename(staging, target)
        return
    written = _written_directories(staging)
    if not all(_owned(target, entry, written) for entry in target.iterdir()):
        _move_files_in(staging, target)
        shutil.rmtree(staging, ignore_errors=True)
        return
    aside = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, aside)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def staged_directory(save_directory):
    """Yield a temporary directory beside ``save_directory``; publish it there if the block completes.

    If the block raises (or is interrupted), the temporary directory is removed and ``save_directory`` is as it was.
    Only the adapters written in the block (folders that get an ``adapter_config.json``) replace what is there.
    """
    target = Path(save_directory).expanduser().absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        carried = _carry_model_cards(target, staging) if target.is_dir() else []
        yield str(staging)
        _drop_unused_cards(staging, carried)
        _publish(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _has_qpa_adapter(peft_model) -> bool:
    from ..peft_types import BOTTLENECK, QPA, QPA_BOTTLENECK, QPA_PREFIX_TUNING, QT

    ours = (QPA, QT, QPA_BOTTLENECK, BOTTLENECK, QPA_PREFIX_TUNING)
    configs = getattr(peft_model, "peft_config", {}) or {}
    return any(
        getattr(config, "peft_type", None) in ours or getattr(config, "qpa_peft_type", None) in ours
        for config in configs.values()
    )


def save_staged(save, peft_model, save_directory, *args, **kwargs):
    """``save(peft_model, save_directory, ...)`` (PEFT's ``save_pretrained``) through a staged directory when the
    model has a QPA adapter: what ``PeftModel.save_pretrained`` does once ``peft_qpa.patches`` has wrapped it.

    Models without a QPA adapter, non-main processes and targets that are files go straight to PEFT's method.

    A ``state_dict`` passed in (the HF Trainer passes the gathered one under FSDP and DeepSpeed ZeRO-3) gets fresh
    snapshots first: ZeRO-3's consolidated state dict is taken without the hooks that refresh them."""
    state_dict = kwargs.get("state_dict")
    tuner = getattr(peft_model, "base_model", None)
    if isinstance(state_dict, dict) and _has_qpa_adapter(peft_model) and hasattr(tuner, "freshen_state_dict"):
        tuner.freshen_state_dict(state_dict)
    if (
        not _has_qpa_adapter(peft_model)
        or not kwargs.get("is_main_process", True)
        or os.path.isfile(os.fspath(save_directory))
    ):
        return save(peft_model, save_directory, *args, **kwargs)
    with staged_directory(save_directory) as staging:
        return save(peft_model, staging, *args, **kwargs)
