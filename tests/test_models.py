"""Model loading: checkpoint files of both kinds, clear errors, local-dir round trip, which models fit trains,
what `--pretrained` resolves to."""

import pytest
import torch
from safetensors.torch import save_file

from cmalign.model.loading import load_model, save_local_dir, select_trainable


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(1)
    return load_model("cmalign-tiny", None)


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pretrained_safetensors_and_torch_state_dict(tmp_path, tiny):
    state = {k: v.contiguous() for k, v in tiny.model.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pt")
    assert _same(load_model("cmalign-tiny", str(tmp_path / "w.safetensors")).model, tiny.model)
    assert _same(load_model("cmalign-tiny", str(tmp_path / "w.pt")).model, tiny.model)


def test_torch_checkpoint_is_loaded_weights_only(tmp_path, tiny):
    class Evil:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    torch.save({"state_dict": tiny.model.state_dict(), "payload": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_model("cmalign-tiny", str(tmp_path / "evil.pt"))


def test_local_dir_round_trip(tmp_path, tiny):
    save_local_dir(tiny.model, tiny.model_cfg, tiny.preprocess_cfg, tmp_path / "m")
    again = load_model(f"local-dir:{tmp_path / 'm'}")
    assert _same(again.model, tiny.model)
    assert again.preprocess_cfg["size"] == tiny.preprocess_cfg["size"]
    assert not list((tmp_path / "m").glob(".*.tmp"))  # atomic writes leave no temp files


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a checkpoint file nor a known tag"):
        load_model("cmalign-tiny", str(tmp_path / "nope.safetensors"))
    with pytest.raises(ValueError, match="cannot be combined"):
        load_model(f"local-dir:{tmp_path}", "x.pt")
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        load_model(f"local-dir:{tmp_path / 'missing'}")


def test_last_n_blocks(tiny):
    counts = select_trainable(tiny.model, "last:1")
    trainable = {n for n, p in tiny.model.named_parameters() if p.requires_grad}
    assert any(n.startswith("visual.transformer.resblocks.1.") for n in trainable)
    assert not any(n.startswith("visual.transformer.resblocks.0.") for n in trainable)
    assert any(n.startswith("transformer.resblocks.1.") for n in trainable)
    assert not any(n.startswith("transformer.resblocks.0.") for n in trainable)
    assert {"visual.proj", "text_projection", "logit_scale"} <= trainable
    assert "token_embedding.weight" not in trainable
    assert 0 < counts["trainable"] < counts["total"]
    with pytest.raises(ValueError, match="last:N"):
        select_trainable(tiny.model, "last:x")
    with pytest.raises(ValueError, match="must be one of"):
        select_trainable(tiny.model, "everything")
    select_trainable(tiny.model, "all")


def test_only_softmax_contrastive_models_are_trained(tiny):
    """TPC-CMA builds on open_clip's softmax ClipLoss: SigLIP (sigmoid + logit_bias) and CoCa are refused."""
    from cmalign.errors import ConfigError
    from cmalign.model.loading import require_softmax_clip

    model = tiny.model
    require_softmax_clip(model, "cmalign-tiny")  # plain CLIP is fine
    model.logit_bias = torch.nn.Parameter(torch.zeros(1))
    try:
        with pytest.raises(ConfigError, match="SigLIP"):
            require_softmax_clip(model, "some-siglip")
    finally:
        model.logit_bias = None
    coca = type("CoCa", (torch.nn.Module,), {})()
    with pytest.raises(ConfigError, match="CoCa"):
        require_softmax_clip(coca, "coca_ViT-B-32")


def test_pretrained_resolution_shared_by_fit_and_eval(tmp_path, monkeypatch):
    """One rule for what `--pretrained` means: cmalign-tiny's default is the embedded base, `random` is none."""
    from cmalign.errors import ConfigError
    from cmalign.model import base

    built = []
    monkeypatch.setattr(base, "ensure_base_model", lambda console=None: built.append(1) or tmp_path)
    weights = str(tmp_path / "open_clip_model.safetensors")
    assert base.resolve_pretrained("cmalign-tiny", None) == weights
    assert base.resolve_pretrained("cmalign-tiny", base.BASE_TAG) == weights
    assert len(built) == 2
    assert base.resolve_pretrained("cmalign-tiny", "random") is None
    assert base.resolve_pretrained("ViT-B-32", None) is None
    assert base.resolve_pretrained("ViT-B-32", "openai") == "openai"
    assert base.resolve_pretrained("cmalign-tiny", "w.pt") == "w.pt"
    with pytest.raises(ConfigError, match="embedded base of cmalign-tiny"):
        base.resolve_pretrained("ViT-B-32", base.BASE_TAG)
    assert len(built) == 2


class _NotAWeight:
    pass


def test_a_checkpoint_torch_refuses_to_unpickle_is_a_user_error(tmp_path):
    """weights_only loading refuses arbitrary objects: that is the file's problem, said in one line."""
    import torch

    from cmalign.model.loading import ModelLoadError, load_model

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": _NotAWeight()}}, path)
    with pytest.raises(ModelLoadError, match=r"cannot load model 'cmalign-tiny' with --pretrained .*evil.pt"):
        load_model("cmalign-tiny", str(path))
