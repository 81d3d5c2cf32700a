"""Saving an adapter so that a reader sees the previous adapter or the new one, never a mix.

``PeftModel.save_pretrained`` writes the weights, then the config, then the model card, straight into the target
directory: a save interrupted in between leaves new weights beside the old config. For models with a QPA adapter,
``import peft_qpa`` wraps it: the adapter is written into a temporary directory beside the target and published
when complete.

* Target absent, or holding only what the save rewrites (``adapter_model.*``, ``adapter_config.json``,
  ``README.md`` and the adapters' own subfolders): the finished directory replaces it by two renames (old one
  aside, new one in place; the old one is then removed). A reader sees the old directory, the new one, or (for
  the instant between the renames) none; never a mix.
* Target holding other files (a Trainer checkpoint, your own files): those are left alone and each adapter file
  is moved in by an atomic rename, the config last. A crash between two renames can still pair new weights with
  the old config; loading then cross-checks the generator against its snapshot and warns if they disagree.

An existing ``README.md`` is copied into the temporary directory first, so the model card is updated as PEFT
updates it, not replaced.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_config.json", "README.md")
CONFIG_NAME = "adapter_config.json"


def _only_adapter_entries(target: Path, new: Path) -> bool:
    """Whether every entry of ``target`` is an adapter file or something the new save writes too."""
    for entry in target.iterdir():
        if entry.name in ADAPTER_FILES and entry.is_file():
            continue
        if entry.is_dir() and (new / entry.name).is_dir() and _only_adapter_entries(entry, new / entry.name):
            continue
        return False
    return True


def _carry_model_cards(target: Path, staging: Path) -> None:
    """Copy the existing model cards into the staging directory, so that saving updates them."""
    for card in [target / "README.md", *target.glob("*/README.md")]:
        if card.is_file():
            destination = staging / card.relative_to(target)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(card, destination)


def _move_files_in(staging: Path, target: Path) -> None:
    """Move every file of ``staging`` to the same place under ``target`` by atomic renames, configs last."""
    files = sorted((p for p in staging.rglob("*") if p.is_file()), key=lambda p: (p.name == CONFIG_NAME, str(p)))
    for path in files:
        destination = target / path.relative_to(staging)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, destination)


def _publish(staging: Path, target: Path) -> None:
    if not target.exists():
        os.rename(staging, target)
        return
    if not _only_adapter_entries(target, staging):
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
    """
    target = Path(save_directory).expanduser().absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        if target.is_dir():
            _carry_model_cards(target, staging)
        yield str(staging)
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


def install_staged_save() -> None:
    """Wrap ``PeftModel.save_pretrained`` (once) so that models with a QPA adapter save through a staged directory.

    Models without a QPA adapter, non-main processes and targets that are files go straight to PEFT's method."""
    from peft import PeftModel

    original = PeftModel.save_pretrained
    if getattr(original, "__peft_qpa_staged__", False):
        return

    def save_pretrained(self, save_directory, *args, **kwargs):
        if (
            not _has_qpa_adapter(self)
            or not kwargs.get("is_main_process", True)
            or os.path.isfile(os.fspath(save_directory))
        ):
            return original(self, save_directory, *args, **kwargs)
        with staged_directory(save_directory) as staging:
            return original(self, staging, *args, **kwargs)

    save_pretrained.__doc__ = original.__doc__
    save_pretrained.__wrapped__ = original
    save_pretrained.__peft_qpa_staged__ = True
    PeftModel.save_pretrained = save_pretrained
