"""Text encoders: the CLIP ViT-L/14 text transformer with its BPE tokenizer, and a byte-level fallback.

    te = TextEncoder(vocab_size, tokens, width, layers, heads, tokenizer)   # architecture only, no I/O
    te = heartbeat.weights.build_text_encoder(cfg, path=None)              # what a config names (+ files)
    ids = te.tokenize(["An ECHO with 2-chamber view."])   # LongTensor (B, cfg.text_tokens)
    h = te(ids)                                          # (B, text_tokens, text_width) last hidden state

Two kinds (`ModelConfig.text_encoder`):
    clip  CLIP's text transformer (token + position embeddings, pre-LN blocks with a causal mask,
          quick-GELU MLP, final LayerNorm); ViT-L/14 for sd15 is 768 wide, 12 layers, 12 heads,
          123,060,480 parameters. Tokenizer: CLIP's byte-level BPE (heartbeat/weights.py reads its
          files: an SD1.5 `tokenizer/` folder, vocab.json + merges.txt, or bpe_simple_vocab_16e6.txt.gz).
    byte  no files needed: UTF-8 bytes + BOS/EOS/PAD (259 ids) into the same transformer, small
          (cfg.text_width/layers/heads), trained with the model.

Parameter names are Hugging Face's CLIPTextModel names (`text_model.embeddings.token_embedding`,
`text_model.encoder.layers.N.self_attn.q_proj`, ...), which SD1.5 single-file checkpoints also use
under `cond_stage_model.transformer.`; heartbeat/weights.py converts OpenAI's names. This module
reads no files.

Text cleaning follows Hugging Face's CLIPTokenizer (NFC, whitespace runs -> one space, lowercase);
OpenAI's original also runs ftfy and html.unescape, which changes only mis-encoded or HTML-escaped text.
"""
from __future__ import annotations

import unicodedata
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention

try:  # \p{L} / \p{N} classes; `regex` comes with most Python installs that have transformers
    import regex as _re
    _PAT = _re.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                       _re.IGNORECASE)
except ImportError:  # close approximation with the standard library (differs on marks and rare numerals)
    import re as _re
    _PAT = _re.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+""",
                       _re.IGNORECASE)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def clean_text(text: str) -> str:
    """NFC, collapse whitespace, strip, lowercase (Hugging Face CLIPTokenizer's normaliser)."""
    return _re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip().lower()


class BPETokenizer:
    """CLIP's BPE: words from the regex pre-tokenizer, bytes mapped to unicode, '</w>' on each word's
    last symbol, merges applied lowest rank first. Ids: BOS, tokens, EOS, padded with `pad_id`
    (EOS, as SD1.5 does) to `length`; longer text is truncated to keep BOS ... EOS."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], length: int = 77, pad_id: int | None = None):
        self.encoder, self.length = vocab, length
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.byte_map = bytes_to_unicode()
        for tok in (BOS, EOS):
            if tok not in vocab:
                raise ValueError(f"BPE vocabulary lacks {tok}; is this a CLIP tokenizer vocabulary?")
        self.bos, self.eos = vocab[BOS], vocab[EOS]
        self.pad = self.eos if pad_id is None else pad_id
        self.cache = {BOS: [BOS], EOS: [EOS]}

    def bpe(self, word: str) -> list[str]:
        if word in self.cache:
            return self.cache[word]
        syms = list(word[:-1]) + [word[-1] + "</w>"]
        while len(syms) > 1:
            pairs = [(self.ranks.get(p, 1 << 60), i) for i, p in enumerate(zip(syms, syms[1:]))]
            rank, first = min(pairs)  # the lowest-ranked pair
            if rank == 1 << 60:
                break
            a, b = syms[first], syms[first + 1]
            out, i = [], 0
            while i < len(syms):  # merge every occurrence of (a, b), left to right
                if i < len(syms) - 1 and syms[i] == a and syms[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            syms = out
        self.cache[word] = syms
        return syms

    def encode(self, text: str) -> list[int]:
        """Token ids without BOS/EOS."""
        ids = []
        for word in _PAT.findall(clean_text(text)):
            word = "".join(self.byte_map[b] for b in word.encode("utf-8")) if word not in (BOS, EOS) else word
            for s in self.bpe(word):
                if s not in self.encoder:
                    s = EOS  # unknown symbol: CLIP's unk token (never happens with the full vocabulary)
                ids.append(self.encoder[s])
        return ids

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return _pack([self.encode(t) for t in _as_list(texts)], self.bos, self.eos, self.pad, self.length)

    @property
    def vocab_size(self) -> int:
        return max(self.encoder.values()) + 1


class ByteTokenizer:
    """UTF-8 bytes of the cleaned text as ids 0..255; BOS 256, EOS 257, PAD 258; `length` tokens."""

    vocab_size = 259

    def __init__(self, length: int = 77):
        self.length, self.bos, self.eos, self.pad = length, 256, 257, 258

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return _pack([list(clean_text(t).encode("utf-8")) for t in _as_list(texts)], self.bos, self.eos, self.pad, self.length)


def _as_list(texts) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    if not all(isinstance(t, str) for t in texts):
        raise TypeError(f"tokenize expects a list of str, got {[type(t).__name__ for t in texts][:4]}")
    return list(texts)


def _pack(seqs: list[list[int]], bos: int, eos: int, pad: int, length: int) -> torch.Tensor:
    out = torch.full((len(seqs), length), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        s = [bos] + s[:length - 2] + [eos]
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out


# ------------------------------------------------------------------------------- transformer

class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int, backend: str = "auto"):
        super().__init__()
        if width % heads:
            raise ValueError(f"text_width={width} is not divisible by text_heads={heads}")
        self.heads, self.backend = heads, backend
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x, mask):
        B, L, C = x.shape
        q, k, v = (p(x).view(B, L, self.heads, C // self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        if mask is None:
            o = attention(q, k, v, backend=self.backend)
        else:  # additive causal mask: the dispatcher has no mask argument, so the fused SDPA path is used
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=mask).transpose(1, 2)
        return self.out_proj(o.reshape(B, L, C))


class CLIPMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick-GELU


class CLIPLayer(nn.Module):
    """Pre-LN: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, width: int, heads: int, hidden: int, backend: str = "auto"):
        super().__init__()
        self.self_attn = CLIPAttention(width, heads, backend)
        self.layer_norm1 = nn.LayerNorm(width, eps=1e-5)
        self.mlp = CLIPMLP(width, hidden)
        self.layer_norm2 = nn.LayerNorm(width, eps=1e-5)

    def forward(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class _Embeddings(nn.Module):
    def __init__(self, vocab: int, tokens: int, width: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.position_embedding = nn.Embedding(tokens, width)


class _Encoder(nn.Module):
    def __init__(self, width, layers, heads, hidden, backend):
        super().__init__()
        self.layers = nn.ModuleList([CLIPLayer(width, heads, hidden, backend) for _ in range(layers)])


class _TextModel(nn.Module):
    def __init__(self, vocab, tokens, width, layers, heads, hidden, backend):
        super().__init__()
        self.embeddings = _Embeddings(vocab, tokens, width)
        self.encoder = _Encoder(width, layers, heads, hidden, backend)
        self.final_layer_norm = nn.LayerNorm(width, eps=1e-5)


class TextEncoder(nn.Module):
    """Tokenizer + CLIP-style transformer. forward(ids (B, L) long, L <= tokens) -> (B, L, width).
    MLP hidden width `mlp_width` (default 4 * width, as CLIP)."""

    def __init__(self, vocab_size: int, tokens: int = 77, width: int = 768, layers: int = 12, heads: int = 12,
                 tokenizer=None, causal: bool = True, backend: str = "auto", mlp_width: int | None = None):
        super().__init__()
        self.text_model = _TextModel(vocab_size, tokens, width, layers, heads, mlp_width or 4 * width, backend)
        self.tokenizer, self.causal, self.tokens, self.width = tokenizer, causal, tokens, width
        self.vocab_size = vocab_size

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise RuntimeError("this CLIP TextEncoder has no tokenizer: give heartbeat.weights.build_text_encoder / "
                               "load_text_encoder a path with vocab.json + merges.txt (an SD1.5 tokenizer/ folder) or "
                               "bpe_simple_vocab_16e6.txt.gz, pass token ids directly, or use --text_encoder=byte")
        return self.tokenizer(texts).to(self.text_model.embeddings.token_embedding.weight.device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.ndim != 2 or ids.dtype not in (torch.long, torch.int32) or ids.shape[1] > self.tokens:
            raise ValueError(f"TextEncoder: expected integer ids (B, L<= {self.tokens}), got {tuple(ids.shape)} "
                             f"{ids.dtype}; use .tokenize(list_of_str)")
        if int(ids.max()) >= self.vocab_size or int(ids.min()) < 0:
            raise ValueError(f"TextEncoder: token id out of range [0, {self.vocab_size}); "
                             "were the ids made by another tokenizer?")
        m = self.text_model
        L = ids.shape[1]
        x = m.embeddings.token_embedding(ids) + m.embeddings.position_embedding.weight[:L]
        mask = None
        if self.causal:
            mask = torch.full((L, L), float("-inf"), device=x.device, dtype=x.dtype).triu(1)
        for layer in m.encoder.layers:
            x = layer(x, mask)
        return m.final_layer_norm(x)
