import json
import shutil

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file

from stages.errors import InvalidRequest
from stages.families import family_for
from stages.models import known_models, load_spec
from stages.request import build_request
from stages.tiny import build_tokenizer, ensure_built
from stages.weights import check_architecture, resolve_weights


def test_shipped_model_configs_load():
    assert {"tiny", "cogvideox-2b", "cogvideox-5b", "i2vgen-xl", "z-image-turbo"} <= set(known_models())
    for name in known_models():
        spec = load_spec(name)
        assert spec.name == name
        family = family_for(spec)
        wan_2_2_vae = "wan22" in name or "wan2.2-ti2v" in name
        multiple = {"i2vgen-xl": 64 if name == "i2vgen-xl" else 16, "wan": 32 if wan_2_2_vae else 16}
        assert family.spatial_multiple == multiple.get(spec.family, 16)
        tokens = {"cogvideox": 16 if name == "framecast-shapes" else 226, "i2vgen-xl": 77,
                  "zimage": 512 if name == "z-image-turbo" else 128,
                  "wan": 64 if name.startswith("tiny") else 512}  # fmt: skip
        assert family.max_text_tokens == tokens[spec.family]
        assert spec.scheduler_name(None)  # every default scheduler is one the model allows


def test_real_architecture_values():
    b2, b5 = load_spec("cogvideox-2b"), load_spec("cogvideox-5b")
    t2, t5 = b2.components["transformer"].config, b5.components["transformer"].config
    assert (t2["num_layers"], t2["num_attention_heads"], t2["use_rotary_positional_embeddings"]) == (30, 30, False)
    assert (t5["num_layers"], t5["num_attention_heads"], t5["use_rotary_positional_embeddings"]) == (42, 48, True)
    assert b2.components["vae"].config["scaling_factor"] == pytest.approx(1.15258426)
    assert b5.components["vae"].config["scaling_factor"] == pytest.approx(0.7)
    assert (b2.dtype, b5.dtype) == ("bfloat16", "bfloat16")  # 2b's weights are fp16; run in bf16 (docs/performance.md)
    assert b2.components["text_encoder"].config["d_model"] == 4096


def test_cogvideox_15_and_i2v_architecture_values():
    v15, i2v = load_spec("cogvideox1.5-5b"), load_spec("cogvideox-5b-i2v")
    t15, ti = v15.components["transformer"].config, i2v.components["transformer"].config
    assert (t15["patch_size_t"], t15["num_attention_heads"], t15["use_rotary_positional_embeddings"]) == (2, 48, True)
    assert (v15.defaults.num_frames, v15.defaults.fps, v15.defaults.width, v15.defaults.height) == (81, 16, 1360, 768)
    assert (v15.limits.num_frames, v15.limits.frame_step) == ((81, 161), 80)  # 81 or 161 frames
    assert (ti["in_channels"], ti["out_channels"], ti["use_learned_positional_embeddings"]) == (32, 16, True)
    assert i2v.takes_image and not v15.takes_image and i2v.pipeline.endswith("CogVideoXImageToVideoPipeline")
    # CogVideoX-5b and its family: DPM-Solver for requests, built from the DDIM config the weights ship
    for spec in (load_spec("cogvideox-5b"), v15, i2v, load_spec("tiny-rope")):
        assert build_request(spec, "a fox", image="x.png" if spec.takes_image else None).scheduler == (
            "CogVideoXDPMScheduler"
        )
    assert build_request(load_spec("cogvideox-2b"), "a fox").scheduler == "CogVideoXDDIMScheduler"


def test_models_command_lists_every_model(capsys, monkeypatch, tmp_path):
    from cluster.cli import main

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    assert main(["models", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)["models"]}
    assert set(listed) == set(known_models())
    assert (listed["cogvideox-2b"]["license"], listed["cogvideox-5b"]["license"]) == ("Apache-2.0", "CogVideoX License")
    assert listed["tiny-i2v"]["kind"] == "i2v" and listed["cogvideox1.5-5b"]["defaults"]["fps"] == 16
    assert listed["cogvideox-2b"]["weights"] == {
        "source": "hub cache",
        "location": "THUDM/CogVideoX-2b",
        "present": False,
    }
    resolve_weights(load_spec("tiny"))  # built: now present
    capsys.readouterr()  # (building imports DeepSpeed, which prints on stdout)
    assert main(["models", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["models"][known_models().index("tiny")]["weights"]["present"]
    assert main(["models"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["MODEL", "KIND", "DEFAULTS", "LIMITS", "CACHES", "LICENSE", "WEIGHTS"]
    assert listed["tiny-wan"]["caches"] == ["none", "fbc:THRESHOLD", "taylorseer:N"]
    assert any(line.startswith("framecast-shapes ") and " fbc,pab,taylorseer " in line for line in table)
    assert any(line.startswith("tiny-i2vgen ") and " - " in line for line in table)
    assert any(line.startswith("cogvideox1.5-5b") and "81-161f by 80" in line for line in table)


def test_unknown_model_lists_known_ones():
    with pytest.raises(InvalidRequest, match=r"unknown model 'cogvideox-9b'; known models: .*cogvideox-2b.*tiny"):
        load_spec("cogvideox-9b")


def test_missing_hub_weights_say_how_to_point_at_them(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    with pytest.raises(InvalidRequest, match=r"THUDM/CogVideoX-2b.*not in the local Hugging Face cache.*give weights"):
        resolve_weights(load_spec("cogvideox-2b"))


def test_weights_dir_without_model_index(tmp_path):
    with pytest.raises(InvalidRequest, match=r"no diffusers weights for tiny at .*model_index.json.*give weights"):
        resolve_weights(load_spec("tiny"), tmp_path)


def test_weights_found_in_local_hub_cache(monkeypatch, tmp_path, tiny_weights):
    """A hub id resolves from the local HF cache layout (models--org--name/snapshots/<rev>)."""
    from dataclasses import replace

    from stages.models import WeightsSpec

    repo = tmp_path / "hub" / "models--framecast--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_weights, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    spec = replace(load_spec("tiny"), weights=WeightsSpec(hub_id="framecast/tiny"))
    assert resolve_weights(spec) == snapshot


def test_architecture_mismatch_is_refused(tmp_path, tiny_spec, tiny_weights):
    copy = tmp_path / "weights"
    shutil.copytree(tiny_weights, copy)
    config = json.loads((copy / "transformer" / "config.json").read_text())
    config["num_layers"] = 7
    (copy / "transformer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidRequest, match=r"not tiny: transformer.num_layers is 7 there but 2 in tiny.yaml"):
        check_architecture(tiny_spec, copy)


def test_tiny_build_is_a_diffusers_directory_and_deterministic(tmp_path, tiny_spec, tiny_weights):
    index = json.loads((tiny_weights / "model_index.json").read_text())
    assert index["_class_name"] == "CogVideoXPipeline"
    assert index["transformer"] == ["diffusers", "CogVideoXTransformer3DModel"]
    again = ensure_built(tiny_spec, tmp_path, family_for(tiny_spec).build_tokenizer)
    assert again != tiny_weights
    for sub in ("transformer", "vae"):
        a = load_file(next((tiny_weights / sub).glob("*.safetensors")))
        b = load_file(next((again / sub).glob("*.safetensors")))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_offline_tokenizer():
    tok = build_tokenizer()
    ids = tok("a cat playing piano", add_special_tokens=True).input_ids
    assert ids[-1] == tok.eos_token_id and len(ids) == 5  # one token per known word, plus </s>
    rare = tok("Xylophone", add_special_tokens=True).input_ids
    assert tok.unk_token_id not in rare  # unknown words fall back to characters


def test_real_layout_sentencepiece_tokenizer_loads(tmp_path, tiny_spec):
    """Real CogVideoX repos ship tokenizer/spiece.model (no tokenizer.json); it loads through the same code."""
    import sentencepiece as spm

    from stages.encoder import load_tokenizer
    from stages.tiny import WORDS

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(WORDS[i : i + 12]) for i in range(0, len(WORDS), 3)))
    folder = tmp_path / "weights" / "tokenizer"
    folder.mkdir(parents=True)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=200, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )  # fmt: skip
    (folder / "spiece.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0}))
    tok = load_tokenizer(tiny_spec, tmp_path / "weights")
    ids = tok("a cat playing piano", padding="max_length", max_length=16, truncation=True).input_ids
    end = ids.index(tok.eos_token_id)
    assert len(ids) == 16 and 0 < end < 15
    assert ids[end + 1 :] == [tok.pad_token_id] * (len(ids) - end - 1)  # padded after </s>, as T5 pads


def test_wan_models_and_their_layouts():
    """Heads (what a Ulysses degree must divide), VAEs, experts and defaults of the real Wan models."""
    from stages.context_parallel import valid_layouts

    heads = {"wan2.1-t2v-1.3b": 12, "wan2.1-t2v-14b": 40, "wan2.1-i2v-14b-480p": 40, "wan2.2-ti2v-5b": 24,
             "wan2.2-ti2v-5b-i2v": 24, "wan2.2-t2v-a14b": 40}  # fmt: skip
    for name, count in heads.items():
        spec = load_spec(name)
        assert family_for(spec).heads == count and spec.limits.frame_step == 4
        assert (spec.defaults.num_frames - 1) % 4 == 0 and spec.defaults.fps in (16, 24)
        build_request(spec, "a fox", image="x.png" if spec.takes_image else None)  # its defaults are valid
    assert load_spec("wan2.2-t2v-a14b").two_experts and load_spec("wan2.2-t2v-a14b").defaults.guidance_scale_2 == 3.0
    assert load_spec("wan2.2-ti2v-5b").components["vae"].config["scale_factor_spatial"] == 16
    assert load_spec("wan2.1-i2v-14b-480p").components["transformer"].config["in_channels"] == 36
    # 8 GPUs: 12 heads (1.3B) take Ulysses up to 4, then ring; 24 (5B) and 40 (14B) take Ulysses 8
    assert [str(v) for v in valid_layouts(8, 12, True)][:3] == ["cfg2xulysses4xring1", "cfg2xulysses2xring2",
                                                                "cfg2xulysses1xring4"]  # fmt: skip
    assert "cfg1xulysses8xring1" in [str(v) for v in valid_layouts(8, 24, True)]
    assert "cfg1xulysses8xring1" not in [str(v) for v in valid_layouts(8, 12, True)]
    assert "cfg1xulysses8xring1" in [str(v) for v in valid_layouts(8, 40, True)]
