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
