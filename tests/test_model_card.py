"""Model cards (issue 10 item 4): README.md in the Hugging Face convention."""

from __future__ import annotations

import yaml
from test_diffusers import write_pipeline


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text[4 : text.index("\n---", 4)])


def test_card_beside_a_file_and_read_back(run, tmp_path, models):
    out = tmp_path / "out" / "merged.safetensors"
    out.parent.mkdir()
    result = run("merge", f"a={models['A']}", f"b={models['B']}", "--alpha", "0.3",
                 "-o", out, "--model-card", "-q")  # fmt: skip
    assert result.code == 0, result.err
    card = (out.parent / "README.md").read_text()
    front = front_matter(card)
    assert front["base_model"] == [str(models["A"]), str(models["B"])]
    assert front["tags"] == ["merge", "weightmix"]
    assert "weighted_sum" in card and "alpha: 0.3" in card and "fingerprint" in card
    shown = run("inspect", out)
    assert f"model card: {out.parent / 'README.md'}" in shown.out
    again = tmp_path / "out" / "again.safetensors"  # a README.md is there now: not replaced
    result = run("merge", models["A"], models["B"], "-o", again, "--model-card")
    assert result.code == 2 and "README.md exists" in result.err and not again.exists()


def test_folder_outputs_get_a_card_by_default(run, tmp_path):
    first, second = tmp_path / "p1", tmp_path / "p2"
    write_pipeline(first, seed=1)
    write_pipeline(second, seed=2)
    out = tmp_path / "merged"
    assert run("merge", first, second, "-o", out, "-q").code == 0
    front = front_matter((out / "README.md").read_text())
    assert front["library_name"] == "diffusers"
    assert front["base_model"] == [str(first), str(second)]
    assert run("merge", first, second, "-o", tmp_path / "bare", "--no-model-card", "-q").code == 0
    assert not (tmp_path / "bare" / "README.md").exists()


def test_cards_belong_to_their_output(run, tmp_path, models):
    first, second = tmp_path / "p1", tmp_path / "p2"
    write_pipeline(first, seed=1)
    write_pipeline(second, seed=2)
    dotted = tmp_path / "out.v2"  # a folder output whose name has a dot
    assert run("merge", first, second, "-o", dotted, "-q").code == 0
    assert (dotted / "README.md").is_file() and not (tmp_path / "README.md").exists()
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    assert run("merge", models["A"], models["B"], "-o", one, "--model-card", "-q").code == 0
    assert run("merge", models["A"], models["C"], "-o", two, "-q").code == 0
    assert "model card" in run("inspect", one).out
    assert "model card" not in run("inspect", two).out  # README.md beside it is one's
