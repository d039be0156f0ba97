"""vlpre's one tokenizer protocol, CLIP's BPE tokenizer, and a registry of tokenizers.

Every tokenizer vlpre builds implements `Tokenizer` in full: CLIP's BPE here, and the
LLMs' and frozen text encoders' `vlpre.llm.TextTokenizer` (which satisfies it without
importing this module). The data pipeline, the text towers, the LLM generator and the
methods read only what the protocol names, so none of them asks a tokenizer what it has.
The LLM text encoders may register their own tokenizers under new names with
`register_tokenizer` without this module importing them.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
import gzip
import html
import importlib.util
import os
from typing import Protocol, runtime_checkable

import ftfy
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer as HfTokenizer
from tokenizers import models, pre_tokenizers


@runtime_checkable
class Tokenizer(Protocol):
  """Texts in, fixed-length ids + mask out, and back.

  Attributes:
    vocab_size: rows of the embedding table its ids index (special tokens included).
    pad_id: the id written into padding positions (mask 0 there; it may be a real token).
    bos_id: the id every row of `encode_batch` starts with (CLIP's <start_of_text>,
      BERT's [CLS]); None when rows start with the text (SmolLM2).
    eos_id: the end-of-text id: ends every row where the tokenizer appends it, and ends
      a generation; None for an encoder without one (BERT).
    special_ids: every id `encode_batch` puts around a text, bos and eos included: the
      ids that carry no text of a caption.
  """

  vocab_size: int
  pad_id: int
  bos_id: int | None
  eos_id: int | None
  special_ids: frozenset[int]

  def encode(self, text: str) -> list[int]:
    """Ids of `text` alone: no special tokens around it, no template."""
    ...

  def encode_batch(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (ids int32 [B, max_len], mask int32 [B, max_len]), right padded.

    Sequences longer than `max_len` are truncated so that the end-of-text token is
    still the last real token (text towers pool at it); mask is 1 on real tokens.
    """
    ...

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """Text of `ids`; ids without a token (a method's own ids after `vocab_size`) have none."""
    ...

  def token_to_id(self, token: str) -> int | None:
    """Id of a token of the vocabulary, e.g. a chat format's "<|im_end|>"; None if absent."""
    ...


# ------------------------------------------------------------------------------- CLIP BPE

CLIP_VOCAB_SIZE = 49408
CLIP_SOT = "<start_of_text>"
CLIP_EOT = "<end_of_text>"
# Same pre-tokenisation regex as OpenAI CLIP / open_clip (the text is lower-cased first).
_CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# open_clip keeps merges[1 : 49152 - 256 - 2 + 1] of the file: 48,894 merges.
_CLIP_NUM_MERGES = 49152 - 256 - 2


def clip_bpe_path() -> str:
  """Path of open_clip's `bpe_simple_vocab_16e6.txt.gz`, found without importing open_clip.

  open_clip is installed with --no-deps only for this file; importing it would import
  torch, so the file is located through the package spec.
  """
  spec = importlib.util.find_spec("open_clip")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "the CLIP BPE vocabulary ships with open-clip-torch; install it with "
        "`pip install --no-deps open-clip-torch` (it is never imported)")
  for location in spec.submodule_search_locations:
    path = os.path.join(location, "bpe_simple_vocab_16e6.txt.gz")
    if os.path.exists(path):
      return path
  raise FileNotFoundError(f"bpe_simple_vocab_16e6.txt.gz not found in {spec.submodule_search_locations}")


def bytes_to_unicode() -> dict[int, str]:
  """CLIP's (= GPT-2's) reversible byte -> printable unicode character table."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
      range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(2**8):
    if b not in bs:
      bs.append(b)
      cs.append(2**8 + n)
      n += 1
  return dict(zip(bs, [chr(c) for c in cs]))


def load_clip_vocab(bpe_path: str | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """Builds CLIP's vocab and merges exactly as open_clip's SimpleTokenizer does."""
  with gzip.open(bpe_path or clip_bpe_path()) as f:
    lines = f.read().decode("utf-8").split("\n")
  merges = [tuple(line.split()) for line in lines[1:_CLIP_NUM_MERGES + 1]]
  byte_chars = list(bytes_to_unicode().values())
  vocab = byte_chars + [c + "</w>" for c in byte_chars]
  vocab += ["".join(m) for m in merges]
  vocab += [CLIP_SOT, CLIP_EOT]
  encoder = {token: i for i, token in enumerate(vocab)}
  assert len(encoder) == CLIP_VOCAB_SIZE, len(encoder)
  return encoder, merges  # type: ignore[return-value]


def clip_clean(text: str) -> str:
  """open_clip's default ("lower") cleaning: ftfy, double html-unescape, whitespace, lower."""
  text = ftfy.fix_text(text)
  text = html.unescape(html.unescape(text)).strip()
  return " ".join(text.split()).strip().lower()


@functools.lru_cache(maxsize=4)
def _build_clip_hf_tokenizer(bpe_path: str):
  """The HF `tokenizers` (Rust) equivalent of SimpleTokenizer's BPE, built once per process."""
  encoder, merges = load_clip_vocab(bpe_path)
  model = models.BPE(vocab=encoder, merges=merges, end_of_word_suffix="</w>",
                     continuing_subword_prefix="", fuse_unk=False)
  tok = HfTokenizer(model)
  # Keep regex matches (invert=True drops what lies between: whitespace), then map the
  # UTF-8 bytes of each piece to CLIP's byte alphabet (ByteLevel without its own regex).
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(_CLIP_PATTERN), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  # open_clip's regex also matches the special tokens literally inside the text.
  tok.add_special_tokens([AddedToken(CLIP_SOT, normalized=False, special=True),
                          AddedToken(CLIP_EOT, normalized=False, special=True)])
  assert tok.token_to_id(CLIP_SOT) == CLIP_VOCAB_SIZE - 2
  assert tok.token_to_id(CLIP_EOT) == CLIP_VOCAB_SIZE - 1
  return tok


class ClipBpeTokenizer:
  """CLIP's BPE tokenizer (49,408 tokens), output like `open_clip.tokenize`.

  `[<start_of_text>, ..., <end_of_text>, 0, 0, ...]`, truncated to `max_len` with
  `<end_of_text>` kept as the last token. Pad id 0 (as open_clip; id 0 is also "!", so
  use the mask). The BPE runs in HF `tokenizers` (Rust); cleaning (ftfy etc.) matches
  open_clip's default "lower" clean function.
  """

  vocab_size: int = CLIP_VOCAB_SIZE
  pad_id: int = 0
  bos_id: int = CLIP_VOCAB_SIZE - 2  # <start_of_text>
  eos_id: int = CLIP_VOCAB_SIZE - 1  # <end_of_text>
  special_ids: frozenset[int] = frozenset((CLIP_VOCAB_SIZE - 2, CLIP_VOCAB_SIZE - 1))

  def __init__(self, bpe_path: str | None = None):
    self._bpe_path = bpe_path or clip_bpe_path()
    self._tok = None

  @property
  def hf_tokenizer(self):
    if self._tok is None:  # lazy: built in the process that uses it, cached per process
      self._tok = _build_clip_hf_tokenizer(self._bpe_path)
    return self._tok

  def __getstate__(self):
    # Pickle only the path: grain workers rebuild (once, cached) instead of receiving
    # a multi-MB serialized tokenizer with every pipeline.
    return {"_bpe_path": self._bpe_path, "_tok": None}

  def encode(self, text: str) -> list[int]:
    """BPE ids of `text` without start/end tokens."""
    return self.hf_tokenizer.encode(clip_clean(text), add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    if max_len < 2:
      raise ValueError(f"max_len must leave room for start and end tokens, got {max_len}")
    if isinstance(texts, str):
      raise TypeError("encode_batch takes a sequence of strings, not a string")
    cleaned = [clip_clean(t) for t in texts]
    if len(cleaned) == 1:  # no thread pool for the per-example path inside grain workers
      encodings = [self.hf_tokenizer.encode(cleaned[0], add_special_tokens=False)]
    else:
      encodings = self.hf_tokenizer.encode_batch(cleaned, add_special_tokens=False)
    ids_BxL = np.full((len(texts), max_len), self.pad_id, np.int32)
    mask_BxL = np.zeros((len(texts), max_len), np.int32)
    for b, enc in enumerate(encodings):
      tokens = [self.bos_id] + enc.ids[:max_len - 2] + [self.eos_id]
      ids_BxL[b, :len(tokens)] = tokens
      mask_BxL[b, :len(tokens)] = 1
    return ids_BxL, mask_BxL

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """Text of `ids` as open_clip decodes it: up to <end_of_text> (padding id 0 is "!"),
    without <start_of_text> / <end_of_text> unless `skip_special_tokens` is False. Ids
    past the vocabulary (e.g. a model's added image tokens) have no text."""
    tok = self.hf_tokenizer
    pieces = []
    for i in map(int, ids):
      piece = tok.id_to_token(i)
      if piece is not None and not (skip_special_tokens and i in self.special_ids):
        pieces.append(piece)
      if i == self.eos_id:
        break
    byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
    data = bytearray(byte_decoder[c] for c in "".join(pieces))
    return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

  def token_to_id(self, token: str) -> int | None:
    return self.hf_tokenizer.token_to_id(token)

  def __repr__(self) -> str:
    return f"ClipBpeTokenizer(vocab_size={self.vocab_size})"


# ------------------------------------------------------------------------------ registry

TokenizerFactory = Callable[..., Tokenizer]
_REGISTRY: dict[str, TokenizerFactory] = {"clip_bpe": ClipBpeTokenizer}


def register_tokenizer(name: str, factory: TokenizerFactory, *, overwrite: bool = False) -> None:
  """Makes `get_tokenizer(name, **kwargs)` call `factory(**kwargs)`.

  Raises:
    ValueError: `name` is taken and `overwrite` is False (two modules fighting over a
      name is a bug worth hearing about).
  """
  if name in _REGISTRY and not overwrite and _REGISTRY[name] is not factory:
    raise ValueError(f"tokenizer {name!r} is already registered ({_REGISTRY[name]!r})")
  _REGISTRY[name] = factory


def get_tokenizer(name: str, **kwargs) -> Tokenizer:
  """Builds the tokenizer registered as `name`."""
  try:
    factory = _REGISTRY[name]
  except KeyError:
    raise KeyError(f"unknown tokenizer {name!r}; registered: {sorted(_REGISTRY)}") from None
  return factory(**kwargs)


def registered_tokenizers() -> list[str]:
  return sorted(_REGISTRY)
