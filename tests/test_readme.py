"""The README's quickstart runs as written."""

import re
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def test_quickstart_runs(tmp_path, monkeypatch, capsys):
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README quickstart", "exec"), {})
    assert (tmp_path / "qpa-adapter" / "adapter_model.safetensors").exists()
    assert '"LORA"' in (tmp_path / "qpa-adapter-as-lora" / "adapter_config.json").read_text()

    out = capsys.readouterr().out
    # the quickstart shows a case where QPA saves parameters, with the figures the README quotes
    ratio = re.search(r"ratio to LoRA with the same r and targets: ([\d.]+)% \((\d+) / (\d+)\)", out)
    assert ratio, out
    assert float(ratio.group(1)) < 100.0
    quoted = re.search(r"```text\n(.*?)```", README.read_text(), re.S).group(1)
    assert ratio.group(0) in quoted
    # a loss per step, falling, as in the README's excerpt
    losses = [float(x) for x in re.findall(r"^step \d+: loss ([\d.]+)$", out, re.M)]
    assert len(losses) == 5 and losses[-1] < losses[0]
    for line in quoted.splitlines():  # the structural lines exactly (loss digits may vary with the CPU's threads)
        if line != "..." and not line.startswith("step "):
            assert line in out.splitlines(), line
    # a short printout: no full circuit drawing
    assert len(out.splitlines()) < 30, out


def test_readme_commands_match_ci():
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    text = README.read_text()
    assert 'pip install torch==2.13.0 -e ".[test]" && python -m pytest -q' in text
    assert 'pip install --quiet torch==2.13.0 -e ".[test]"' in ci and "python -m pytest -q" in ci


def test_family_snippets_run(tmp_path, monkeypatch, capsys):
    """Each member's README snippet runs as written, on tiny stand-ins for ``base`` and ``cnn``."""
    import torch
    from peft import get_peft_model
    from torch import nn

    import peft_qpa
    from tiny_models import tiny_llama

    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 8 * 8, 10)

        def forward(self, x):
            x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
            return self.fc(x.flatten(1))

    section = README.read_text().split("## The family", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 5, blocks
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        torch.manual_seed(0)
        namespace = {"peft_qpa": peft_qpa, "get_peft_model": get_peft_model, "base": tiny_llama(), "cnn": CNN(),
                     "base_copy": tiny_llama()}
        exec(compile(block, "README family", "exec"), namespace)
        assert isinstance(namespace.get("model", namespace.get("trained_cnn")), nn.Module)
    assert '"use_dora": true' in (tmp_path / "dora-twin" / "adapter_config.json").read_text()
    assert '"PREFIX_TUNING"' in (tmp_path / "prefix-twin" / "adapter_config.json").read_text()
    assert isinstance(namespace["trained_cnn"], CNN)
    assert "generated numbers M:" in capsys.readouterr().out
