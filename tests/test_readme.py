"""The README's quickstart runs as written."""

import re
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def test_quickstart_runs(tmp_path, monkeypatch):
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README quickstart", "exec"), {})
    assert (tmp_path / "qpa-adapter" / "adapter_model.safetensors").exists()
    assert '"LORA"' in (tmp_path / "qpa-adapter-as-lora" / "adapter_config.json").read_text()


def test_readme_commands_match_ci():
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    text = README.read_text()
    assert 'pip install torch==2.13.0 -e ".[test]" && python -m pytest -q' in text
    assert 'pip install --quiet torch==2.13.0 -e ".[test]"' in ci and "python -m pytest -q" in ci
