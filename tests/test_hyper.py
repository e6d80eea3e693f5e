"""Hyper-Merge (issue 9 items 3-5): toy cases with known answers, reconstruction, evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import load, save

from weightmix.hyper.shared import normalise, top_eigenvector


def write_config(tmp_path: Path, models: list[Path], ranks: list[int], extra=None) -> Path:
    """The seed's keys (name, models, device, dtype, iterations, ranks) and compute_dtype."""
    config = {
        "name": "toy",
        "models": [str(m) for m in models],
        "device": "cpu",
        "dtype": "float64",
        "iterations": 4,
        "ranks": ranks,
        "compute_dtype": "fp64",
    }
    config.update(extra or {})  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def rank_one(generator, rows: int, cols: int, index: int) -> torch.Tensor:
    """e_index · f_indexᵀ scaled: rank-one matrices with orthogonal rows and columns."""
    out = torch.zeros(rows, cols, dtype=torch.float64)
    out[index, index] = 1.0 + torch.rand(1, generator=generator, dtype=torch.float64).item()
    return out


def test_three_models_in_two_rank_one_directions_reconstruct_exactly(run, tmp_path):
    """W_m = B0 + a_m·D1 + b_m·D2 in two layers, with the same a, b: ranks [1, 1] rebuild
    every model to 1e-12, and the multipliers are a − mean(a), b − mean(b) up to scale."""
    generator = torch.Generator().manual_seed(0)
    a = torch.tensor([3.0, -1.0, 1.0], dtype=torch.float64)
    b = torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)  # a and b centred: orthogonal
    layers = {}
    for name, (rows, cols) in (("first.weight", (6, 5)), ("second.weight", (4, 7))):
        base = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
        layers[name] = (
            base,
            rank_one(generator, rows, cols, 0),
            rank_one(generator, rows, cols, 1),
        )
    paths = []
    for m in range(3):
        state = {n: b0 + a[m] * d1 + b[m] * d2 for n, (b0, d1, d2) in layers.items()}
        paths.append(save(tmp_path / f"model{m}.safetensors", state))
    config = write_config(tmp_path, paths, [1, 1])
    result = run("hyper", config, "-q")
    assert result.code == 0, result.err
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("toy_"))
    assert names == ["toy_0-1.safetensors", "toy_1-1.safetensors", "toy_average.safetensors",
                     "toy_multipliers.json", "toy_multipliers.txt"]  # fmt: skip
    document = json.loads((tmp_path / "toy_multipliers.json").read_text())
    first, second = (torch.tensor(entry["multipliers"]) for entry in document["loras"])
    for found, coefficients in ((first, a), (second, b)):
        centred = (coefficients - coefficients.mean()).double()
        largest = centred[centred.abs().argmax()]  # λ is scaled so that this entry is +1
        torch.testing.assert_close(found.double(), centred / largest, atol=1e-12, rtol=0)
    lines = (tmp_path / "toy_multipliers.txt").read_text().splitlines()
    assert lines[1] == f"<lora:toy_0-1:{first[1].item():.6g}> <lora:toy_1-1:{second[1].item():.6g}>"
    for m, path in enumerate(paths):
        out = tmp_path / f"rebuilt{m}.safetensors"
        assert run("hyper", "reconstruct", config, "--model", m, "-o", out, "-q").code == 0
        rebuilt, original = load(out), load(path)
        for key in original:
            assert (rebuilt[key] - original[key]).abs().max() < 1e-12
    report = run("hyper", "evaluate", config)
    assert report.code == 0
    rows = [line.split() for line in report.out.splitlines()[2:]]
    assert len(rows) == 4 and rows[3][3] == "all"  # three models, then all together
    assert all(float(r[0]) < 1e-12 and float(r[1]) < 1e-12 for r in rows)
    assert float(rows[3][2]) < 1e-7  # two directions span the deltas: the tail is zero


def test_two_models_give_opposite_multipliers(run, tmp_path):
    """W1 = [[2, 0], [0, 0]], W2 = 0: mean [[1, 0], [0, 0]], λ = (1, −1), δ = W1 − mean."""
    one = save(
        tmp_path / "one.safetensors", {"w.weight": torch.tensor([[2.0, 0], [0, 0]]).double()}
    )
    zero = save(tmp_path / "zero.safetensors", {"w.weight": torch.zeros(2, 2).double()})
    config = write_config(tmp_path, [one, zero], [1])
    assert run("hyper", config, "-q").code == 0
    document = json.loads((tmp_path / "toy_multipliers.json").read_text())
    assert document["loras"][0]["multipliers"] == [1.0, -1.0]
    lora = load(tmp_path / "toy_0-1.safetensors")
    update = lora["lora_unet_w.lora_up.weight"] @ lora["lora_unet_w.lora_down.weight"]
    torch.testing.assert_close(update, torch.tensor([[1.0, 0], [0, 0]]).double())


def test_the_start_is_the_top_gram_eigenvector_scaled_to_one():
    gram = torch.tensor([[4.0, -2.0], [-2.0, 1.0]])  # eigenvector (2, −1) of eigenvalue 5
    torch.testing.assert_close(top_eigenvector(gram), torch.tensor([1.0, -0.5]).double())
    torch.testing.assert_close(normalise(torch.tensor([0.5, -2.0])), torch.tensor([-0.25, 1.0]))


def test_error_falls_with_rank_and_vanishes_at_full_rank(run, tmp_path):
    generator = torch.Generator().manual_seed(1)
    paths = [save(tmp_path / f"m{m}.safetensors",
                  {"w.weight": torch.randn(6, 5, generator=generator, dtype=torch.float64)})
             for m in range(3)]  # fmt: skip
    errors = []
    for ranks in ([1, 1], [2, 2], [5, 5]):
        folder = tmp_path / f"r{ranks[0]}"
        folder.mkdir()
        config = write_config(folder, paths, ranks)
        assert run("hyper", config, "-q").code == 0
        report = run("hyper", "evaluate", config)
        rows = [line.split() for line in report.out.splitlines()[2:]]
        errors.append(max(float(r[0]) for r in rows[:3]))
        together = rows[3]  # the bound holds for the models together, not each one
        # (the bound is the root of a sum of Gram eigenvalues: its floor is about 1e-8)
        assert together[3] == "all" and float(together[0]) >= float(together[2]) - 1e-7
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-10


def refused(run, args: list, says: str) -> None:
    result = run(*args)
    assert result.code == 2, result.err
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0], result.err


@pytest.mark.parametrize(
    ("change", "says"),
    [({"iterations": 1}, "iterations: Input should be greater than or equal to 2"),
     ({"ranks": []}, "ranks: List should have at least 1 item"),
     ({"models": ["only-one.safetensors"]}, "models: List should have at least 2 items")],
)  # fmt: skip
def test_bad_configs_are_refused(run, tmp_path, change, says):
    paths = [
        save(tmp_path / f"m{m}.safetensors", {"w.weight": torch.randn(3, 3)}) for m in range(2)
    ]
    config = write_config(tmp_path, paths, [1], change)  # replaces ranks or models too
    refused(run, ["hyper", config], says)
    assert not list(tmp_path.glob("toy_*"))


def test_other_architectures_and_unknown_models_are_refused(run, tmp_path):
    first = save(tmp_path / "a.safetensors", {"w.weight": torch.randn(3, 3)})
    other = save(tmp_path / "b.safetensors", {"v.weight": torch.randn(3, 3)})
    config = write_config(tmp_path, [first, other], [1])
    refused(run, ["hyper", config], "Hyper-Merge needs models of one architecture")
    assert not list(tmp_path.glob("toy_*"))
    second = save(tmp_path / "c.safetensors", {"w.weight": torch.randn(3, 3)})
    config = write_config(tmp_path, [first, second], [1])
    assert run("hyper", config, "-q").code == 0
    out = tmp_path / "x.safetensors"
    refused(run, ["hyper", "reconstruct", config, "--model", "7", "-o", out], "--model 7")
    document = json.loads((tmp_path / "toy_multipliers.json").read_text())
    document["models"][1] = str(tmp_path / "stranger.safetensors")
    (tmp_path / "toy_multipliers.json").write_text(json.dumps(document))
    refused(run, ["hyper", "reconstruct", config, "--model", "0", "-o", out],
            "names model")  # fmt: skip
    assert not out.exists()


def test_evaluate_refuses_reordered_models_and_outputs_into_a_file(run, tmp_path):
    paths = [
        save(tmp_path / f"m{m}.safetensors", {"w.weight": torch.randn(3, 3)}) for m in range(2)
    ]
    config = write_config(tmp_path, paths, [1])
    assert run("hyper", config, "-q").code == 0
    reordered = write_config(tmp_path, paths[::-1], [1])
    refused(run, ["hyper", "evaluate", reordered], "the multipliers follow the file's order")
    refused(run, ["hyper", write_config(tmp_path, paths, [1], {"output": str(paths[0])})],
            "is a file")  # fmt: skip


@pytest.mark.parametrize("chunk_bytes", [1, 64 << 20])
def test_evaluate_matches_a_dense_computation(run, tmp_path, monkeypatch, chunk_bytes):
    """evaluate's three columns against dense torch on whole layers: a tall layer (12 × 5), a
    wide one (4 × 9, a 3×3 conv's shape), a bias without LoRA; read a row at a time
    (chunk_bytes 1) and all at once."""
    from weightmix.hyper import evaluate as evaluation
    from weightmix.hyper.config import load_config

    monkeypatch.setattr(evaluation, "CHUNK_BYTES", chunk_bytes)
    generator = torch.Generator().manual_seed(3)
    shapes = {"tall.weight": (12, 5), "wide.weight": (4, 1, 3, 3), "tall.bias": (12,)}
    paths = []
    for m in range(4):
        state = {k: torch.randn(s, generator=generator).double() for k, s in shapes.items()}
        paths.append(save(tmp_path / f"m{m}.safetensors", state))
    config = write_config(tmp_path, paths, [1, 2])
    assert run("hyper", config, "-q").code == 0
    settings, folder = load_config(config)
    reports = evaluation.evaluate(settings, folder, evaluation.read_outputs(settings, folder, None))
    rows = [[r.hyper, r.private, r.bound] for r in reports]
    average = load(tmp_path / "toy_average.safetensors")
    document = json.loads((tmp_path / "toy_multipliers.json").read_text())
    loras = [load(tmp_path / entry["file"]) for entry in document["loras"]]
    lam = [entry["multipliers"] for entry in document["loras"]]
    total, hyper, private = (torch.zeros(4, dtype=torch.float64) for _ in range(3))
    deltas = []
    for m, path in enumerate(paths):
        model = load(path)
        flat = []
        for key in shapes:
            delta = (model[key] - average[key]).reshape(shapes[key][0], -1)
            flat.append(delta.reshape(-1))
            total[m] += delta.square().sum()
            if key == "tall.bias":
                hyper[m] += delta.square().sum()
                private[m] += delta.square().sum()
                continue
            name = "lora_unet_" + key.removesuffix(".weight")
            residual = delta.clone()
            for k, lora in enumerate(loras):
                up = lora[f"{name}.lora_up.weight"].reshape(delta.shape[0], -1).double()
                down = lora[f"{name}.lora_down.weight"].reshape(-1, delta.shape[1]).double()
                residual -= lam[k][m] * (up @ down)
            hyper[m] += residual.square().sum()
            private[m] += torch.linalg.svdvals(delta)[3:].square().sum()  # total rank 1 + 2
        deltas.append(torch.cat(flat))
    stacked = torch.stack(deltas)
    tail = torch.linalg.eigvalsh(stacked @ stacked.T)[:2].clamp(min=0).sum()  # 4 − 2 LoRAs
    for m in range(4):
        expected = [float((hyper[m] / total[m]).sqrt()), float((private[m] / total[m]).sqrt())]
        assert rows[m][:2] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    whole = total.sum()
    expected = [float((x / whole).sqrt()) for x in (hyper.sum(), private.sum(), tail)]
    assert rows[4] == pytest.approx(expected, rel=1e-9, abs=1e-12)
