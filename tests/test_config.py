import pytest

from heartbeat.config import ConfigError, Config, PRESETS, get_config


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_resolve_and_roundtrip(name):
    cfg = get_config(name)
    assert cfg.model.preset == name
    assert cfg.model.image_size % cfg.model.vae_factor == 0
    again = Config.from_dict(cfg.to_dict())
    assert again == cfg


def test_overrides_typed():
    cfg = get_config("tiny", ["--lr=3e-4", "--max_steps=7", "--grad_checkpointing",
                              "--unet_channels=32,64", "--attn_levels=false,true", "--stage=finetune"])
    assert cfg.train.lr == 3e-4 and cfg.train.max_steps == 7 and cfg.model.grad_checkpointing is True
    assert cfg.model.unet_channels == (32, 64) and cfg.model.attn_levels == (False, True)
    assert cfg.train.stage == "finetune"


@pytest.mark.parametrize("args,needle", [
    (["--nope=1"], "unknown option --nope"),
    (["--lr=abc"], "--lr=abc"),
    (["--attn_backend=cuda"], "attn_backend"),
    (["--conditions=text,heartrate"], "heartrate"),
    (["--stage=train"], "--stage=train"),
])
def test_bad_overrides_are_named(args, needle):
    with pytest.raises(ConfigError, match=needle.replace("-", r"\-").replace(".", r"\.")):
        get_config("tiny", args)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="sd15"):
        get_config("sd21")
