"""`weightmix similarity` (issue 10 item 1) against dense torch sums on tiny SD1.5 models."""

from __future__ import annotations

import json

import torch
from archs import UNET, hand_sd_block, shapes_of, tiny_state
from helpers import save


def test_similarity_per_block_matches_dense_sums(run, tmp_path):
    shapes = {k: v for k, v in shapes_of("sd1").items() if k.startswith(UNET)}
    states = [tiny_state(shapes, seed) for seed in range(3)]
    states[1] = {k: 0.5 * states[0][k] + 0.1 * v for k, v in states[1].items()}  # alike A
    paths = [save(tmp_path / f"{n}.safetensors", s) for n, s in zip("abc", states)]
    result = run("similarity", *paths, "--json", "--alpha", "1.2")
    assert result.code == 0, result.err
    document = json.loads(result.out)
    for block in ("IN01", "M00", "OUT11"):
        keys = [k for k in shapes if hand_sd_block(k, "OUT11") == block]
        a, b, c = (torch.cat([s[k].double().reshape(-1) for k in keys]) for s in states)
        row = document["groups"][f"diffuser/{block}"]
        for other, figures in zip((b, c), row["models"]):
            cosine = float(a @ other / (a.norm() * other.norm()))
            assert abs(figures["cosine"] - cosine) < 1e-9
            assert abs(figures["relative_l2"] - float((other - a).norm() / a.norm())) < 1e-9
            assert abs(figures["scale"] - float(a @ other / (other @ other))) < 1e-9
        from_c = float(((a - 1.2 * b).abs() > (a - c).abs()).double().mean())
        assert abs(row["lossless"]["c"] - from_c) < 1e-12
        assert abs(row["maxdiff"]["b"] - from_c) < 1e-12
    assert document["groups"]["diffuser/IN01"]["models"][0]["cosine"] > 0.9  # b is mostly a
    table = run("similarity", *paths, "-q")
    assert table.code == 0 and "diffuser/IN01" in table.out and "lossless b/c" in table.out


def test_similarity_needs_two_models_of_one_kind(run, tmp_path):
    one = save(tmp_path / "one.safetensors", {"w": torch.ones(2)})
    other = save(tmp_path / "other.safetensors", {"v": torch.ones(2)})
    result = run("similarity", one)
    assert result.code == 2 and "at least two" in result.err
    result = run("similarity", one, other, "-q")
    assert result.code == 2 and "share no key" in result.err


def test_heatmap_cells_follow_the_values(run, tmp_path):
    from matplotlib import colormaps
    from PIL import Image

    from weightmix.analysis.plots import DPI, geometry

    shapes = {k: v for k, v in shapes_of("sd1").items() if k.startswith(UNET)}
    states = [tiny_state(shapes, seed) for seed in range(3)]
    states[1] = {k: 0.5 * states[0][k] + 0.1 * v for k, v in states[1].items()}
    paths = [save(tmp_path / f"{n}.safetensors", s) for n, s in zip("abc", states)]
    plot = tmp_path / "similarity.png"
    result = run("similarity", *paths, "--json", "--plot", plot)
    assert result.code == 0, result.err
    groups = json.loads(result.out)["groups"]
    names = list(groups)
    width, height, (left, bottom, span_x, span_y) = geometry(2, len(names))
    image = Image.open(plot).convert("RGB")
    assert image.size == (round(width * DPI), round(height * DPI))
    for row in range(2):
        for column, name in enumerate(names):
            value = groups[name]["models"][row]["cosine"]
            x = (left + span_x * (column + 0.2) / len(names)) * image.size[0]
            top = 1 - bottom - span_y  # the heatmap's top edge, from the image's top
            y = (top + span_y * (row + 0.2) / 2) * image.size[1]  # row 0 is drawn on top
            expected = colormaps["viridis"]((value + 1) / 2)[:3]
            found = image.getpixel((int(x), int(y)))
            assert all(abs(f / 255 - e) < 0.03 for f, e in zip(found, expected)), (name, row)


def test_plot_into_a_missing_folder_is_refused_before_reading(run, tmp_path):
    a = save(tmp_path / "a.safetensors", {"w": torch.ones(2)})
    b = save(tmp_path / "b.safetensors", {"w": torch.zeros(2)})
    result = run("similarity", a, b, "--plot", tmp_path / "nowhere" / "p.png")
    assert result.code == 2 and "does not exist" in result.err
