"""Text encoders: BPE tokenizer vs transformers.CLIPTokenizer, CLIP text model vs CLIPTextModel, byte fallback."""
import collections
import gzip
import json

import pytest
import torch

from heartbeat.config import get_config
from heartbeat.text import BPETokenizer, ByteTokenizer, TextEncoder, bytes_to_unicode
from heartbeat.weights import build_text_encoder, read_tokenizer
from heartbeat.weights import load_into

CORPUS = ("an echo with 2-chamber view . an echo with 4-chamber view of the heart , apical two chamber and four "
          "chamber views ; the left ventricle and the left atrium , ejection fraction 55 % echocardiography "
          "of a patient with a dilated heart , mitral valve annulus , speckle , the end diastole , it's they're")

TRICKY = [
    "An ECHO with 2-chamber view.",
    "Hello,   world!!  123 4.5% (apical) [LV] {LA} a_b c-d e/f",
    "café naïve — über 日本語 😀 ﬁ Ｆｕｌｌ",
    "it's THEY'RE we'll I'd you've i'm don't",
    "  leading and trailing \n\t whitespace  ",
    "",
    " ".join(["echocardiography of the left ventricle"] * 40),  # longer than 77 tokens: truncated
]


def _learn_bpe(text: str, n_merges: int = 120):
    """A small CLIP-style vocabulary: bytes, bytes + '</w>', merge results, BOS, EOS."""
    b2u = bytes_to_unicode()
    words = collections.Counter("".join(b2u[b] for b in w.encode()) for w in text.split())
    seqs = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in words}
    merges = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, s in seqs.items():
            for p in zip(s, s[1:]):
                pairs[p] += words[w]
        if not pairs:
            break
        best = max(sorted(pairs), key=lambda p: pairs[p])
        merges.append(best)
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i < len(s) - 1 and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    syms = list(b2u.values())
    syms = syms + [s + "</w>" for s in syms] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {s: i for i, s in enumerate(syms)}, merges


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokenizer")
    vocab, merges = _learn_bpe(CORPUS)
    (d / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    # OpenAI's format: a header line, then the merges (the real file is cut after 48,894 of them)
    with gzip.open(d / "bpe_simple_vocab_16e6.txt.gz", "wt", encoding="utf-8") as f:
        f.write("bpe_simple_vocab_16e6.txt header\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return d


def test_bpe_matches_transformers(tok_dir):
    transformers = pytest.importorskip("transformers")
    ref = transformers.CLIPTokenizer.from_pretrained(str(tok_dir))
    ours = read_tokenizer(str(tok_dir), 77)
    want = ref(TRICKY, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    got = ours(TRICKY)
    assert got.shape == (len(TRICKY), 77)
    for i, t in enumerate(TRICKY):
        assert got[i].tolist() == want[i].tolist(), t
    assert got[0, 0] == ours.bos and got[-1, -1] == ours.eos  # truncation keeps EOS
    assert (got[5, :2] == torch.tensor([ours.bos, ours.eos])).all() and (got[5, 2:] == ours.eos).all()  # pad = EOS
    assert len(ours.encode("echocardiography")) < len("echocardiography")  # merges really apply


def test_openai_gz_format_gives_same_ids(tok_dir):
    a = read_tokenizer(str(tok_dir))
    b = read_tokenizer(str(tok_dir / "bpe_simple_vocab_16e6.txt.gz"))
    assert torch.equal(a(TRICKY), b(TRICKY))


def test_full_clip_vocabulary_layout():
    """With OpenAI's numbering, BOS and EOS are 49406 and 49407 (48,894 merges)."""
    merges = [(f"x{i}", f"y{i}") for i in range(49152 - 256 - 2)]
    syms = list(bytes_to_unicode().values())
    syms = syms + [s + "</w>" for s in syms] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    tok = BPETokenizer({s: i for i, s in enumerate(syms)}, merges)
    ids = tok(["a"])
    assert ids[0, :3].tolist() == [49406, syms.index("a</w>"), 49407] and ids[0, -1] == 49407


def _tiny_ref():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                                      layer_norm_eps=1e-5)
    torch.manual_seed(0)
    ref = transformers.CLIPTextModel(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref


def test_text_model_matches_transformers():
    ref = _tiny_ref()
    ours = TextEncoder(100, 77, 32, 2, 4, backend="math").eval()
    sd = {k if k.startswith("text_model.") else "text_model." + k: v  # transformers 5 drops the prefix
          for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
    load_into(ours, sd, "HF CLIPTextModel")
    ids = torch.randint(0, 100, (2, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(input_ids=ids).last_hidden_state
        got = ours(ids)
    assert got.shape == (2, 77, 32)
    assert ((got - want).norm() / want.norm()).item() < 1e-4


def test_causal_mask():
    te = TextEncoder(100, 77, 32, 2, 4).eval()
    ids = torch.randint(0, 100, (1, 77), generator=torch.Generator().manual_seed(2))
    ids2 = ids.clone()
    ids2[0, 40] = (ids[0, 40] + 1) % 100
    with torch.no_grad():
        a, b = te(ids), te(ids2)
    assert torch.allclose(a[:, :40], b[:, :40], atol=1e-6)  # earlier tokens cannot see the change
    assert not torch.allclose(a[:, 40:], b[:, 40:], atol=1e-3)


def test_sd15_parameter_count():
    with torch.device("meta"):
        te = build_text_encoder(get_config("sd15").model)
    assert sum(p.numel() for p in te.parameters()) == 123_060_480
    assert tuple(te.state_dict()["text_model.encoder.layers.11.mlp.fc1.weight"].shape) == (3072, 768)


def test_clip_build_with_tokenizer_folder(tok_dir):
    cfg = get_config("tiny", ["--text_encoder=clip"]).model
    te = build_text_encoder(cfg, str(tok_dir))
    ids = te.tokenize(["An ECHO with 2-chamber view."])
    assert ids.shape == (1, 77) and te(ids).shape == (1, 77, cfg.text_width)
    with pytest.raises(RuntimeError, match="vocab.json"):
        build_text_encoder(cfg).tokenize(["x"])


def test_byte_encoder():
    cfg = get_config("tiny").model
    te = build_text_encoder(cfg)
    ids = te.tokenize(["An ECHO", "é", "", "x" * 500])
    assert ids.shape == (4, cfg.text_tokens) and ids.dtype == torch.long
    assert ids[0, :4].tolist() == [256, ord("a"), ord("n"), ord(" ")]
    assert ids[1, :4].tolist() == [256, 0xC3, 0xA9, 257] and ids[1, 4] == 258
    assert ids[3, -1] == 257 and ids[3, -2] == ord("x")
    h = te(ids)
    assert h.shape == (4, cfg.text_tokens, cfg.text_width)
    h.sum().backward()
    assert te.text_model.embeddings.token_embedding.weight.grad is not None
    assert ByteTokenizer(10)(["abcdefghijkl"]).shape == (1, 10)


def test_bad_input():
    te = TextEncoder(100, 77, 32, 1, 4)
    with pytest.raises(ValueError, match="token id out of range"):
        te(torch.full((1, 77), 100))
    with pytest.raises(ValueError, match="tokenize"):
        te(torch.zeros(1, 77))
    with pytest.raises(TypeError, match="list of str"):
        ByteTokenizer()([1, 2])
    with pytest.raises(ValueError, match="context_dim"):
        build_text_encoder(get_config("tiny", ["--text_width=64"]).model)
