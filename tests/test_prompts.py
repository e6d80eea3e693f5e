"""Prompt-conditioned merging (issue 8 item 4): `concept` and spectral's `prompt_coefficients`.

Text encoders are tiny transformers CLIPTextModels built from configs; the tokenizer is a tiny
byte-pair vocabulary written here. References are the whole model run by transformers, and the
projection written as a dense formula."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load, save
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from weightmix.io import open_checkpoint
from weightmix.methods.prompted import SPECTRAL_COEFFICIENTS
from weightmix.prompts.clip import run_encoder
from weightmix.prompts.encoders import find_text_encoders

UNET = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0."
SD1_TEXT = "cond_stage_model.transformer.text_model."
LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORDS = ("red", "fox", "cat", "blue", "sky")
PROMPT = "a red fox under blue sky"


def write_vocabulary(folder: Path) -> Path:
    """vocab.json and merges.txt of a tiny CLIP-style BPE: letters, letters</w>, a few words."""
    folder.mkdir(parents=True, exist_ok=True)
    merges: list[tuple[str, str]] = []
    for word in WORDS:  # merge left to right: r e -> re, re d</w> -> red</w>
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append((parts[0], parts[1]))
            parts = [parts[0] + parts[1], *parts[2:]]
    tokens = [*LETTERS, *(c + "</w>" for c in LETTERS), *dict.fromkeys(a + b for a, b in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    text = "".join(f"{a} {b}\n" for a, b in dict.fromkeys(merges))
    (folder / "merges.txt").write_text("#version: 0.2\n" + text)
    return folder


def vocabulary_size(folder: Path) -> int:
    return len(json.loads((folder / "vocab.json").read_text()))


def tiny_clip(seed: int, width: int, vocab: int, act: str = "quick_gelu") -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3,
        num_attention_heads=width // 64, max_position_embeddings=12, hidden_act=act,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    model = CLIPTextModel(config).eval()
    with torch.no_grad():  # LayerNorms start at 1 and 0: make them count
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(0.3 * torch.randn_like(parameter))
    return model


def hf_state(model: CLIPTextModel) -> dict[str, torch.Tensor]:
    """transformers' names without 'text_model.' (the module layout differs by version)."""
    return {k.removeprefix("text_model."): v.clone() for k, v in model.state_dict().items()}


def open_clip_state(model: CLIPTextModel) -> dict[str, torch.Tensor]:
    """The same weights with OpenCLIP's names: q, k, v fused into in_proj."""
    hf = hf_state(model)
    out = {
        "token_embedding.weight": hf["embeddings.token_embedding.weight"],
        "positional_embedding": hf["embeddings.position_embedding.weight"],
        "ln_final.weight": hf["final_layer_norm.weight"],
        "ln_final.bias": hf["final_layer_norm.bias"],
    }
    for layer in range(model.config.num_hidden_layers):
        source, target = f"encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            fused = [hf[f"{source}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{target}attn.in_proj_{kind}"] = torch.cat(fused)
            pairs = (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                     ("attn.out_proj", "self_attn.out_proj"), ("mlp.c_fc", "mlp.fc1"),
                     ("mlp.c_proj", "mlp.fc2"))  # fmt: skip
            for theirs, ours in pairs:
                out[f"{target}{theirs}.{kind}"] = hf[f"{source}{ours}.{kind}"]
    return out


def token_ids(folder: Path, text: str) -> list[int]:
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    return list(tokenizer(text)["input_ids"])


def states(model: CLIPTextModel, ids: list[int]) -> tuple[torch.Tensor, ...]:
    """Reference: the whole model run by transformers; every hidden state, tokens × width."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return tuple(h[0] for h in out.hidden_states)


def final_norm(model: CLIPTextModel, hidden: torch.Tensor) -> torch.Tensor:
    core = getattr(model, "text_model", model)
    with torch.no_grad():
        return core.final_layer_norm(hidden)


def unet_state(seed: int, width: int, inner: int = 32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = {
        "attn2.to_k.weight": (inner, width),
        "attn2.to_v.weight": (inner, width),
        "attn2.to_q.weight": (inner, inner),
        "attn1.to_k.weight": (inner, inner),
        "norm1.bias": (inner,),
    }
    return {UNET + k: torch.randn(s, generator=generator) for k, s in shapes.items()}


@pytest.fixture
def tokenizer_dir(tmp_path: Path) -> Path:
    return write_vocabulary(tmp_path / "tokenizer")


@pytest.fixture
def sd1_pair(tmp_path: Path, tokenizer_dir: Path):
    """Two SD1-layout files: the same CLIP text encoder (64 wide), different UNets."""
    clip = tiny_clip(0, 64, vocabulary_size(tokenizer_dir))
    text = {f"cond_stage_model.transformer.text_model.{k}": v for k, v in hf_state(clip).items()}
    paths = {}
    for name, seed in (("A", 1), ("B", 2)):
        paths[name] = save(tmp_path / f"{name}.safetensors", {**text, **unet_state(seed, 64)})
    return paths, clip


def test_streamed_encoder_matches_transformers_for_each_layout(tmp_path, tokenizer_dir):
    """SD1 (last state, final norm), SD2 (penultimate, then the norm) and SDXL (penultimate
    of both, no norm, side by side): one layer in memory at a time, the same numbers as the
    whole model."""
    vocab = vocabulary_size(tokenizer_dir)
    ids = token_ids(tokenizer_dir, PROMPT)
    clip_l, big_g = tiny_clip(3, 64, vocab), tiny_clip(4, 128, vocab, act="gelu")
    layouts = {
        "sd1": {f"{SD1_TEXT}{k}": v for k, v in hf_state(clip_l).items()},
        "sd2": {f"cond_stage_model.model.{k}": v for k, v in open_clip_state(big_g).items()},
        "sdxl": {
            **{f"conditioner.embedders.0.transformer.text_model.{k}": v
               for k, v in hf_state(clip_l).items()},
            **{f"conditioner.embedders.1.model.{k}": v for k, v in open_clip_state(big_g).items()},
        },
    }  # fmt: skip
    widths = {"sd1": [64], "sd2": [128], "sdxl": [64, 128]}
    for layout, state in layouts.items():
        path = save(tmp_path / f"{layout}.safetensors", {k: v.half() for k, v in state.items()})
        with open_checkpoint(path) as checkpoint:
            encoders = find_text_encoders(checkpoint, layout)
            assert [e.width for e in encoders] == widths[layout]
            for encoder in encoders:
                # the file holds fp16 weights: the reference runs the same rounded weights
                model = clip_l if encoder.width == 64 else big_g
                rounded = tiny_clip(0, encoder.width, vocab, model.config.hidden_act)
                rounded.load_state_dict(
                    {k: v.half().float() for k, v in model.state_dict().items()}
                )
                hidden = states(rounded, ids)
                if layout == "sd1":
                    want = final_norm(rounded, hidden[-1])
                elif layout == "sd2":
                    want = final_norm(rounded, hidden[-2])
                else:
                    want = hidden[-2]
                context, final = run_encoder(encoder, ids)
                torch.testing.assert_close(context, want, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(
                    final, final_norm(rounded, hidden[-1]), atol=1e-5, rtol=1e-5
                )


def test_concept_answers_the_prompt_like_b_and_the_rest_like_a(
    run, tmp_path, sd1_pair, tokenizer_dir
):
    paths, clip = sd1_pair
    out = tmp_path / "concept.safetensors"
    result = run(
        "merge", f"A={paths['A']}", f"B={paths['B']}", "-m", "concept", "-p", f"prompt={PROMPT}",
        "--tokenizer", tokenizer_dir, "-o", out, "-q",
    )  # fmt: skip
    assert result.code == 0, result.err
    merged, a, b = load(out), load(paths["A"]), load(paths["B"])
    ids = token_ids(tokenizer_dir, PROMPT)
    context = final_norm(clip, states(clip, ids)[-1])[1:-1].double()  # the prompt's tokens
    basis = torch.linalg.svd(context.T, full_matrices=False)[0]
    rng = torch.Generator().manual_seed(5)
    inside = context.T @ torch.randn(len(ids) - 2, 3, generator=rng, dtype=torch.float64)
    outside = torch.randn(64, 3, generator=rng, dtype=torch.float64)
    outside -= basis @ (basis.T @ outside)
    for kind in ("to_k", "to_v"):
        key = f"{UNET}attn2.{kind}.weight"
        w, w_a, w_b = (t[key].double() for t in (merged, a, b))
        torch.testing.assert_close(w @ inside, w_b @ inside, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(w @ outside, w_a @ outside, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(w @ inside, w_a @ inside, atol=1e-2)
    for key in merged:  # everything else is A's
        if "attn2.to_k" not in key and "attn2.to_v" not in key:
            assert torch.equal(merged[key], a[key]), key


def test_concept_alpha_scales_the_step_toward_b(run, tmp_path, sd1_pair, tokenizer_dir):
    paths, clip = sd1_pair
    out = tmp_path / "half.safetensors"
    assert run(
        "merge", f"A={paths['A']}", f"B={paths['B']}", "-m", "concept", "-p", "prompt=red fox",
        "-p", "alpha=0.5", "--tokenizer", tokenizer_dir, "-o", out, "-q",
    ).code == 0  # fmt: skip
    ids = token_ids(tokenizer_dir, "red fox")
    context = final_norm(clip, states(clip, ids)[-1])[1:-1].double()
    projection = context.T @ torch.linalg.pinv(context.T)  # P onto the span, dense formula
    key = f"{UNET}attn2.to_v.weight"
    w_a, w_b = load(paths["A"])[key].double(), load(paths["B"])[key].double()
    expected = w_a + 0.5 * (w_b - w_a) @ projection
    torch.testing.assert_close(load(out)[key].double(), expected, atol=1e-5, rtol=1e-5)


def test_prompt_coefficients_are_the_seeded_projection_of_the_pooled_embedding(
    run, tmp_path, sd1_pair, tokenizer_dir
):
    """spectral with prompt_coefficients = spectral with c = R·p/|p|, R standard normal from
    the recipe seed, p the end token's final state: computed here and given as coefficients."""
    paths, clip = sd1_pair
    ids = token_ids(tokenizer_dir, PROMPT)
    pooled = final_norm(clip, states(clip, ids)[-1])[-1].double().numpy()
    rng = np.random.Generator(np.random.PCG64DXSM(np.random.SeedSequence([7, 0x5EC7])))
    projection = rng.standard_normal((SPECTRAL_COEFFICIENTS, 64))
    coefficients = projection @ (pooled / np.linalg.norm(pooled))
    by_prompt, given = tmp_path / "prompt.safetensors", tmp_path / "given.safetensors"
    common = ["merge", f"A={paths['A']}", f"B={paths['B']}", "-m", "spectral", "--seed", "7"]
    common += ["-q", "--tokenizer", tokenizer_dir]
    assert run(*common, "-p", f"prompt_coefficients={PROMPT}", "-o", by_prompt).code == 0
    listed = "[" + ",".join(repr(float(c)) for c in coefficients) + "]"
    assert run(*common, "-p", f"coefficients={listed}", "-o", given).code == 0
    first, second = load(by_prompt), load(given)
    for key in first:
        torch.testing.assert_close(first[key], second[key], atol=2e-6, rtol=1e-5)
    other = tmp_path / "other.safetensors"
    assert run(*common, "-p", "prompt_coefficients=blue cat", "-o", other).code == 0
    key = f"{UNET}attn2.to_k.weight"
    assert not torch.allclose(load(other)[key], first[key])


def test_diffusers_folder_gives_text_encoder_config_and_tokenizer(run, tmp_path, sd1_pair):
    """--text-encoder a diffusers folder: its text_encoder/config.json (gelu here) and its
    tokenizer/ are used; no --tokenizer needed."""
    paths, _ = sd1_pair
    folder = tmp_path / "pipeline"
    write_vocabulary(folder / "tokenizer")
    clip = tiny_clip(9, 64, vocabulary_size(folder / "tokenizer"), act="gelu")
    clip.save_pretrained(folder / "text_encoder")
    (folder / "model_index.json").write_text(json.dumps({"text_encoder": ["transformers", "x"]}))
    out = tmp_path / "out.safetensors"
    result = run(
        "merge", f"A={paths['A']}", f"B={paths['B']}", "-m", "concept", "-p", "prompt=blue sky",
        "--text-encoder", folder, "-o", out,
    )  # fmt: skip
    assert result.code == 0, result.err
    assert f"tokenizer: {folder / 'tokenizer'}" in result.err
    ids = token_ids(folder / "tokenizer", "blue sky")
    context = states(clip, ids)[-1]  # gelu: quick_gelu would give other numbers
    context = final_norm(clip, context)[1:-1].double()
    projection = context.T @ torch.linalg.pinv(context.T)
    key = f"{UNET}attn2.to_k.weight"
    w_a, w_b = load(paths["A"])[key].double(), load(paths["B"])[key].double()
    torch.testing.assert_close(
        load(out)[key].double(), w_a + (w_b - w_a) @ projection, atol=1e-5, rtol=1e-5
    )
    saved = tmp_path / "saved.yaml"
    assert run(
        "merge", f"A={paths['A']}", f"B={paths['B']}", "-m", "concept", "-p", "prompt=blue sky",
        "--text-encoder", folder, "--dry-run", "--save-recipe", saved,
    ).code == 0  # fmt: skip
    rerun = tmp_path / "rerun.safetensors"
    assert run("merge", saved, "-o", rerun, "-q").code == 0
    assert torch.equal(load(rerun)[key], load(out)[key])


def test_tokenizer_from_a_package_vocabulary(run, tmp_path, sd1_pair, monkeypatch):
    """No --tokenizer and no tokenizer/ folder: the BPE file an installed open_clip ships is
    turned into CLIP's vocabulary (256 byte characters, the same with </w>, one per merge)."""
    paths, _ = sd1_pair
    package = tmp_path / "site" / "open_clip"
    package.mkdir(parents=True)
    with gzip.open(package / "bpe_simple_vocab_16e6.txt.gz", "wt", encoding="utf-8") as file:
        file.write("#version\nr e\nre d</w>\nf o\nfo x</w>\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    from weightmix.prompts.tokenizer import find_tokenizer

    tokenizer = find_tokenizer(None, [paths["A"]]).load()
    # ids: 512 byte tokens, then red</w> is the 2nd merge (513), fox</w> the 4th (515)
    assert list(tokenizer("red fox")["input_ids"]) == [516, 513, 515, 517]
    assert "open_clip" in find_tokenizer(None, [paths["A"]]).text
    # single characters in CLIP's byte order: printable bytes first ('!' is 0), then with </w>
    assert list(tokenizer("a !")["input_ids"]) == [516, 256 + ord("a") - ord("!"), 256, 517]


def refused(run, args: list[object], says: str, out: Path) -> None:
    result = run("merge", *args, "-o", out)
    assert result.code == 2, result.err
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0], result.err
    assert not out.exists()


def test_prompt_without_text_encoder_is_refused(run, tmp_path, sd1_pair, tokenizer_dir):
    bare = {name: save(tmp_path / f"bare{name}.safetensors", unet_state(s, 64))
            for name, s in (("A", 1), ("B", 2))}  # fmt: skip
    args = [f"A={bare['A']}", f"B={bare['B']}", "-m", "concept", "-p", "prompt=red fox",
            "--tokenizer", tokenizer_dir]  # fmt: skip
    refused(run, args, "has none and no --text-encoder was given", tmp_path / "o.safetensors")
    paths, _ = sd1_pair  # with one given, the same models merge
    ok = tmp_path / "ok.safetensors"
    assert run("merge", *args, "--text-encoder", paths["A"], "-o", ok).code == 0


def test_width_mismatch_and_missing_tokenizer_are_refused(run, tmp_path, sd1_pair, tokenizer_dir):
    paths, _ = sd1_pair
    wide = tiny_clip(1, 128, vocabulary_size(tokenizer_dir))
    other = save(
        tmp_path / "wide.safetensors", {f"text_model.{k}": v for k, v in hf_state(wide).items()}
    )
    base = [f"A={paths['A']}", f"B={paths['B']}", "-m", "concept", "-p", "prompt=red fox"]
    out = tmp_path / "o.safetensors"
    refused(
        run,
        [*base, "--tokenizer", tokenizer_dir, "--text-encoder", other],
        "reads 64-wide text, but the prompt's embedding is 128 wide",
        out,
    )
    refused(run, base, "no --tokenizer was given", out)
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(run, [*base, "--tokenizer", empty], "holds no vocab.json", out)
    recipe = tmp_path / "empty.yaml"
    recipe.write_text(json.dumps({
        "models": {"A": str(paths["A"]), "B": str(paths["B"])}, "tokenizer": str(tokenizer_dir),
        "merge": {"method": "concept", "inputs": ["A", "B"], "prompt": ""},
    }))  # fmt: skip
    refused(run, [recipe], "at least 1 character", out)
    spectral = [f"A={paths['A']}", f"B={paths['B']}", "-m", "spectral", "-p", "coefficients=0.2",
                "-p", "prompt_coefficients=red", "--tokenizer", tokenizer_dir]  # fmt: skip
    refused(run, spectral, "give coefficients or prompt_coefficients, not both", out)


def test_the_wizard_asks_where_the_prompt_is_read(
    run, tmp_path, sd1_pair, tokenizer_dir, monkeypatch
):
    """A prompt answer is taken as typed ('yes' is not YAML's true); the wizard then asks for
    the text encoder and the tokenizer, and the merge equals the command line's."""
    import io

    paths, _ = sd1_pair
    out = tmp_path / "wizard.safetensors"
    lines = [paths["A"], paths["B"], "", out, "concept", "yes", "", "", tmp_path / "nowhere",
             tokenizer_dir, "y"]  # fmt: skip
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    result = run("wizard")
    assert result.code == 0, result.err
    assert "nowhere: no such file or folder" in result.err
    direct = tmp_path / "direct.safetensors"
    assert run(
        "merge", f"A={paths['A']}", f"B={paths['B']}", "-m", "concept", "-p", "prompt=yes",
        "--tokenizer", tokenizer_dir, "-o", direct, "-q",
    ).code == 0  # fmt: skip
    merged, expected = load(out), load(direct)
    assert all(torch.equal(merged[k], expected[k]) for k in expected)
    assert not torch.equal(
        merged[f"{UNET}attn2.to_k.weight"], load(paths["A"])[f"{UNET}attn2.to_k.weight"]
    )


def test_sdxl_file_without_the_unused_last_layer(tmp_path, tokenizer_dir):
    """SDXL single files may leave out CLIP-L's last layer and final norm (their context is the
    penultimate state): the last layer present then gives the context, as the complete model's
    penultimate state."""
    vocab = vocabulary_size(tokenizer_dir)
    torch.manual_seed(11)
    config = CLIPTextConfig(vocab_size=vocab, hidden_size=768, intermediate_size=32,
                            num_hidden_layers=12, num_attention_heads=12,
                            max_position_embeddings=12, hidden_act="quick_gelu")  # fmt: skip
    model = CLIPTextModel(config).eval()
    state = hf_state(model)
    trimmed = {
        f"conditioner.embedders.0.transformer.text_model.{k}": v
        for k, v in state.items()
        if not k.startswith(("encoder.layers.11.", "final_layer_norm."))
    }
    path = save(tmp_path / "sdxl-te.safetensors", trimmed)
    ids = token_ids(tokenizer_dir, PROMPT)
    with open_checkpoint(path) as checkpoint:
        (encoder,) = find_text_encoders(checkpoint, "sdxl")
        context, final = run_encoder(encoder, ids)
    assert final is None
    torch.testing.assert_close(context, states(model, ids)[-2], atol=1e-5, rtol=1e-5)


def test_prompt_problems_found_before_reading(run, tmp_path, sd1_pair, tokenizer_dir):
    """A rule that changes the prompt by key, a broken vocab.json, a text encoder missing a
    layer's tensor: one line each, exit 2, nothing written."""
    paths, clip = sd1_pair
    out = tmp_path / "o.safetensors"
    recipe = tmp_path / "rule.yaml"
    recipe.write_text(yaml_text({
        "models": {"A": str(paths["A"]), "B": str(paths["B"])}, "tokenizer": str(tokenizer_dir),
        "merge": {"method": "concept", "inputs": ["A", "B"], "prompt": "red fox"},
        "rules": [{"keys": "*attn2.to_v*", "params": {"prompt": "blue sky"}}],
    }))  # fmt: skip
    refused(run, [recipe], "a rule sets prompt for some keys", out)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "vocab.json").write_text('{"a": 0')
    (broken / "merges.txt").write_text("#version: 0.2\n")
    base = [f"A={paths['A']}", f"B={paths['B']}", "-m", "concept", "-p", "prompt=red fox"]
    refused(run, [*base, "--tokenizer", broken], "cannot be read", out)
    state = {f"{SD1_TEXT}{k}": v for k, v in hf_state(clip).items()}
    del state[f"{SD1_TEXT}encoder.layers.1.mlp.fc2.bias"]
    holey = save(tmp_path / "holey.safetensors", state)
    args = [*base, "--tokenizer", tokenizer_dir, "--text-encoder", holey]
    refused(run, args, "has no encoder.layers.1.mlp.fc2.bias", out)
    result = run("merge", *args, "--dry-run")
    assert result.code == 2


def yaml_text(data: dict) -> str:
    return json.dumps(data)  # JSON is YAML
