"""Strict pretrained loading against Direct3D-S2's published layout and ctvq's own checkpoints.

The layout is the tensor list (names and shapes) of Direct3D-S2's published ``sparse_vae_512.pth``, embedded
so the tests run anywhere without the 1 GB file.
The 512-wide model is only constructed (about 38M parameters), never run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ctvq.models import SparseSDFVQVAE
from ctvq.models.pretrained import (
    PretrainedWeightsError,
    checkpoint_payload,
    infer_model_config,
    inspect_weights,
    load_pretrained,
)

D3D_PARAMS = {
    "embed_dim": 16, "resolution": 64, "model_channels_encoder": 512, "num_blocks_encoder": 4,
    "num_heads_encoder": 8, "num_head_channels_encoder": 64, "model_channels_decoder": 512,
    "num_blocks_decoder": 4, "num_heads_decoder": 8, "num_head_channels_decoder": 64, "out_channels": 1,
    "use_fp16": True, "chunk_size": 1,
}


def fact_layout() -> dict[str, tuple[int, ...]]:
    lines = D3D_LAYOUT_TSV.splitlines()
    rows = (line.split("\t") for line in lines[1:])
    return {key: tuple(int(d) for d in shape.split("x")) for key, shape in rows}


def synthetic_d3d_state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=gen).half() for k, shape in fact_layout().items()}


def write_d3d(path: Path, state: dict[str, torch.Tensor], params: dict | None = None) -> Path:
    torch.save({"vae": state, "config": {"target": "SparseSDFVAE", "params": params or D3D_PARAMS}}, path)
    return path


@pytest.fixture(scope="module")
def model_512_4() -> SparseSDFVQVAE:
    return SparseSDFVQVAE(model_channels=512, latent_channels=16, num_blocks=4, num_embeddings=64)


def test_model_state_dict_equals_the_direct3d_s2_fact_file(model_512_4):
    layout = fact_layout()
    assert len(layout) == 116
    ours = {k: tuple(v.shape) for k, v in model_512_4.state_dict().items() if not k.startswith("quantizer.")}
    assert ours == layout
    assert sum(int(torch.tensor(s).prod()) for s in layout.values()) == 37_874_113
    assert tuple(model_512_4.state_dict()["quantizer.embedding.weight"].shape) == (64, 16)


def test_fp16_direct3d_checkpoint_loads_strictly_and_keeps_the_codebook(tmp_path, model_512_4):
    state = synthetic_d3d_state()
    path = write_d3d(tmp_path / "sparse_vae_512.pth", state)
    codebook_before = model_512_4.quantizer.codebook.detach().clone()
    report = load_pretrained(model_512_4, path)
    assert report.loaded_keys == 116 and not report.codebook_loaded and report.source_dtypes == ("float16",)
    loaded = model_512_4.state_dict()
    for key in ("encoder.downsample.2.out_layers.0.conv.kernel", "decoder.blocks.3.mlp.mlp.2.weight",
                "decoder.out_layer.bias"):
        assert loaded[key].dtype == torch.float32
        assert torch.equal(loaded[key], state[key].float())
    assert torch.equal(model_512_4.quantizer.codebook.detach(), codebook_before)


def test_raw_state_dict_without_wrapper_loads(tmp_path, model_512_4):
    state = synthetic_d3d_state(seed=1)
    path = tmp_path / "raw.pth"
    torch.save(state, path)
    assert load_pretrained(model_512_4, path).loaded_keys == 116


@pytest.mark.parametrize(
    "edit, expected",
    [
        ("remove", r"missing keys \(1\): decoder\.blocks\.2\.attn\.to_out\.bias"),
        ("rename", r"unexpected keys \(1\): decoder\.blocks\.2\.attn\.to_out\.b"),
        ("reshape", r"mis-shaped \(1\): decoder\.blocks\.2\.attn\.to_out\.bias: checkpoint \(256,\)"),
    ],
)
def test_removed_renamed_or_reshaped_key_fails_naming_it(tmp_path, model_512_4, edit, expected):
    state = synthetic_d3d_state()
    key = "decoder.blocks.2.attn.to_out.bias"
    if edit == "remove":
        del state[key]
    elif edit == "rename":
        state[key[:-3]] = state.pop(key)
    else:
        state[key] = state[key][:256]
    path = write_d3d(tmp_path / f"{edit}.pth", state)
    with pytest.raises(PretrainedWeightsError, match=expected) as err:
        load_pretrained(model_512_4, path)
    assert str(path) in str(err.value)
    if edit == "rename":
        assert "missing keys (1): decoder.blocks.2.attn.to_out.bias" in str(err.value)


def test_eight_block_model_refuses_four_block_checkpoint_listing_the_difference(tmp_path):
    model = SparseSDFVQVAE(model_channels=512, latent_channels=16, num_blocks=8, num_embeddings=16)
    path = write_d3d(tmp_path / "sparse_vae_512.pth", synthetic_d3d_state())
    before = model.encoder.blocks[5].attn.to_qkv.weight.detach().clone()
    with pytest.raises(PretrainedWeightsError) as err:
        load_pretrained(model, path)
    message = str(err.value)
    assert "checkpoint num_blocks_encoder=4 but model num_blocks=8" in message
    assert "checkpoint num_blocks_decoder=4 but model num_blocks=8" in message
    assert "missing keys (64)" in message  # 4 blocks x 8 tensors x (encoder, decoder)
    assert "missing keys (64): decoder.blocks.4." in message and ", ... and 58 more" in message  # readable
    assert torch.equal(model.encoder.blocks[5].attn.to_qkv.weight.detach(), before)  # nothing half-loaded


def test_config_mismatch_alone_is_an_error(tmp_path, model_512_4):
    path = write_d3d(tmp_path / "cfg.pth", synthetic_d3d_state(), {**D3D_PARAMS, "resolution": 128})
    with pytest.raises(PretrainedWeightsError, match="checkpoint resolution=128 but model resolution=64"):
        load_pretrained(model_512_4, path)


def test_ctvq_checkpoint_with_codebook_round_trips_whole(tmp_path):
    kwargs = dict(model_channels=32, latent_channels=4, num_blocks=1, num_embeddings=8, num_head_channels=16,
                  codebook_init="kmeans")
    source = SparseSDFVQVAE(**kwargs)
    source.quantizer.embedding.weight.data.normal_()
    source.quantizer.initialised.fill_(True)
    path = tmp_path / "vqvae_step0000002.pt"
    torch.save(checkpoint_payload(source), path)
    target = SparseSDFVQVAE(**kwargs)
    report = load_pretrained(target, path)
    assert report.codebook_loaded
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    partial = checkpoint_payload(source)
    del partial["vae"]["quantizer.cluster_size"]
    torch.save(partial, path)
    with pytest.raises(PretrainedWeightsError, match=r"missing keys \(1\): quantizer\.cluster_size"):
        load_pretrained(SparseSDFVQVAE(**kwargs), path)


def test_unreadable_or_non_weight_files_are_refused_naming_the_file(tmp_path, model_512_4):
    bad = tmp_path / "notes.pth"
    bad.write_text("not a checkpoint")
    with pytest.raises(PretrainedWeightsError, match=r"notes.pth: not a torch checkpoint \(neither a torch"):
        load_pretrained(model_512_4, bad)
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        load_pretrained(model_512_4, tmp_path / "absent.pth")
    mixed = tmp_path / "mixed.pth"
    torch.save({"step": 3, "encoder.input_layer.weight": torch.zeros(2)}, mixed)
    with pytest.raises(PretrainedWeightsError, match="not tensors: step"):
        load_pretrained(model_512_4, mixed)


def test_inspect_weights_reports_layout_and_matching_config(tmp_path):
    path = write_d3d(tmp_path / "sparse_vae_512.pth", synthetic_d3d_state())
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "d3d_4blocks.json").write_text(
        '{"models": {"vqvae": {"args": {"model_channels": 512, "latent_channels": 16, "num_blocks": 4}}}}'
    )
    (configs / "default_8blocks.json").write_text('{"models": {"vqvae": {"args": {"num_blocks": 8}}}}')
    report, problems = inspect_weights(path, configs)
    assert problems == [] and "layout: complete" in report
    assert "tensors: 116" in report
    assert "parameters: 37,874,113" in report
    assert "float16 x116" in report
    assert "model_channels=512, latent_channels=16, num_blocks_encoder=4, num_blocks_decoder=4" in report
    assert "matching configs in" in report and "d3d_4blocks.json" in report.split("matching configs")[1]
    assert "default_8blocks.json: num_blocks: file 4 vs config 8" in report
    assert infer_model_config(synthetic_d3d_state())["mlp_ratio"] == 4.0


D3D_LAYOUT_TSV = """\
key	shape
encoder.input_layer1.weight	32x1
encoder.input_layer1.bias	32
encoder.downsample.0.act_layers.0.weight	32
encoder.downsample.0.act_layers.0.bias	32
encoder.downsample.0.out_layers.0.conv.kernel	27x32x64
encoder.downsample.0.out_layers.0.conv.bias	64
encoder.downsample.0.out_layers.1.weight	64
encoder.downsample.0.out_layers.1.bias	64
encoder.downsample.0.out_layers.3.conv.kernel	27x64x64
encoder.downsample.0.out_layers.3.conv.bias	64
encoder.downsample.0.skip_connection.conv.kernel	32x64
encoder.downsample.0.skip_connection.conv.bias	64
encoder.downsample.1.act_layers.0.weight	64
encoder.downsample.1.act_layers.0.bias	64
encoder.downsample.1.out_layers.0.conv.kernel	27x64x128
encoder.downsample.1.out_layers.0.conv.bias	128
encoder.downsample.1.out_layers.1.weight	128
encoder.downsample.1.out_layers.1.bias	128
encoder.downsample.1.out_layers.3.conv.kernel	27x128x128
encoder.downsample.1.out_layers.3.conv.bias	128
encoder.downsample.1.skip_connection.conv.kernel	64x128
encoder.downsample.1.skip_connection.conv.bias	128
encoder.downsample.2.act_layers.0.weight	128
encoder.downsample.2.act_layers.0.bias	128
encoder.downsample.2.out_layers.0.conv.kernel	27x128x512
encoder.downsample.2.out_layers.0.conv.bias	512
encoder.downsample.2.out_layers.1.weight	512
encoder.downsample.2.out_layers.1.bias	512
encoder.downsample.2.out_layers.3.conv.kernel	27x512x512
encoder.downsample.2.out_layers.3.conv.bias	512
encoder.downsample.2.skip_connection.conv.kernel	128x512
encoder.downsample.2.skip_connection.conv.bias	512
encoder.input_layer.weight	512x512
encoder.input_layer.bias	512
encoder.blocks.0.attn.to_qkv.weight	1536x512
encoder.blocks.0.attn.to_qkv.bias	1536
encoder.blocks.0.attn.to_out.weight	512x512
encoder.blocks.0.attn.to_out.bias	512
encoder.blocks.0.mlp.mlp.0.weight	2048x512
encoder.blocks.0.mlp.mlp.0.bias	2048
encoder.blocks.0.mlp.mlp.2.weight	512x2048
encoder.blocks.0.mlp.mlp.2.bias	512
encoder.blocks.1.attn.to_qkv.weight	1536x512
encoder.blocks.1.attn.to_qkv.bias	1536
encoder.blocks.1.attn.to_out.weight	512x512
encoder.blocks.1.attn.to_out.bias	512
encoder.blocks.1.mlp.mlp.0.weight	2048x512
encoder.blocks.1.mlp.mlp.0.bias	2048
encoder.blocks.1.mlp.mlp.2.weight	512x2048
encoder.blocks.1.mlp.mlp.2.bias	512
encoder.blocks.2.attn.to_qkv.weight	1536x512
encoder.blocks.2.attn.to_qkv.bias	1536
encoder.blocks.2.attn.to_out.weight	512x512
encoder.blocks.2.attn.to_out.bias	512
encoder.blocks.2.mlp.mlp.0.weight	2048x512
encoder.blocks.2.mlp.mlp.0.bias	2048
encoder.blocks.2.mlp.mlp.2.weight	512x2048
encoder.blocks.2.mlp.mlp.2.bias	512
encoder.blocks.3.attn.to_qkv.weight	1536x512
encoder.blocks.3.attn.to_qkv.bias	1536
encoder.blocks.3.attn.to_out.weight	512x512
encoder.blocks.3.attn.to_out.bias	512
encoder.blocks.3.mlp.mlp.0.weight	2048x512
encoder.blocks.3.mlp.mlp.0.bias	2048
encoder.blocks.3.mlp.mlp.2.weight	512x2048
encoder.blocks.3.mlp.mlp.2.bias	512
encoder.out_layer.weight	32x512
encoder.out_layer.bias	32
decoder.input_layer.weight	512x16
decoder.input_layer.bias	512
decoder.blocks.0.attn.to_qkv.weight	1536x512
decoder.blocks.0.attn.to_qkv.bias	1536
decoder.blocks.0.attn.to_out.weight	512x512
decoder.blocks.0.attn.to_out.bias	512
decoder.blocks.0.mlp.mlp.0.weight	2048x512
decoder.blocks.0.mlp.mlp.0.bias	2048
decoder.blocks.0.mlp.mlp.2.weight	512x2048
decoder.blocks.0.mlp.mlp.2.bias	512
decoder.blocks.1.attn.to_qkv.weight	1536x512
decoder.blocks.1.attn.to_qkv.bias	1536
decoder.blocks.1.attn.to_out.weight	512x512
decoder.blocks.1.attn.to_out.bias	512
decoder.blocks.1.mlp.mlp.0.weight	2048x512
decoder.blocks.1.mlp.mlp.0.bias	2048
decoder.blocks.1.mlp.mlp.2.weight	512x2048
decoder.blocks.1.mlp.mlp.2.bias	512
decoder.blocks.2.attn.to_qkv.weight	1536x512
decoder.blocks.2.attn.to_qkv.bias	1536
decoder.blocks.2.attn.to_out.weight	512x512
decoder.blocks.2.attn.to_out.bias	512
decoder.blocks.2.mlp.mlp.0.weight	2048x512
decoder.blocks.2.mlp.mlp.0.bias	2048
decoder.blocks.2.mlp.mlp.2.weight	512x2048
decoder.blocks.2.mlp.mlp.2.bias	512
decoder.blocks.3.attn.to_qkv.weight	1536x512
decoder.blocks.3.attn.to_qkv.bias	1536
decoder.blocks.3.attn.to_out.weight	512x512
decoder.blocks.3.attn.to_out.bias	512
decoder.blocks.3.mlp.mlp.0.weight	2048x512
decoder.blocks.3.mlp.mlp.0.bias	2048
decoder.blocks.3.mlp.mlp.2.weight	512x2048
decoder.blocks.3.mlp.mlp.2.bias	512
decoder.upsample.0.act_layers.0.conv.kernel	27x512x128
decoder.upsample.0.act_layers.0.conv.bias	128
decoder.upsample.0.out_layers.0.conv.kernel	27x128x128
decoder.upsample.0.out_layers.0.conv.bias	128
decoder.upsample.1.act_layers.0.conv.kernel	27x128x64
decoder.upsample.1.act_layers.0.conv.bias	64
decoder.upsample.1.out_layers.0.conv.kernel	27x64x64
decoder.upsample.1.out_layers.0.conv.bias	64
decoder.upsample.2.act_layers.0.conv.kernel	27x64x32
decoder.upsample.2.act_layers.0.conv.bias	32
decoder.upsample.2.out_layers.0.conv.kernel	27x32x32
decoder.upsample.2.out_layers.0.conv.bias	32
decoder.out_layer.weight	1x32
decoder.out_layer.bias	1
"""
