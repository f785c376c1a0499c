"""The README is a manual: within its limits, the answer on its first screen, and its code runs."""
import os
import re

from conftest import REPO, run_script, tiny_args

README = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()


def test_the_readme_is_a_manual_with_the_answer_first():
    lines = README.splitlines()
    assert len(lines) <= 300 and len(README) <= 25000
    first = "\n".join(lines[:60])
    assert "<!-- results table: scripts/compare.py writes it -->" in first and "FSQ" in first and "DDCL" in first
    assert "<<" not in README  # nothing left to fill in


def test_the_checkpoint_snippet_runs_as_written_from_another_folder(tmp_path, image_folder):
    """After `pip install -e .` (as .ci/run does) the root's modules import from any folder."""
    snippet = re.search(r"## Using a checkpoint\n\n```python\n(.*?)```", README, re.S).group(1)
    # the snippet's relative path, as from the folder a run was started in
    result = run_script(os.path.join(REPO, "train.py"), *tiny_args(tmp_path, image_folder, quantizer="fsq",
                                                                   checkpoint_dir="checkpoints"), cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    script = tmp_path / "snippet.py"
    script.write_text(snippet)
    done = run_script(str(script), cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("bits per image")
