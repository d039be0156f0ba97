"""Fixed-length batch tokenization for frozen text encoders."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tokenizers


def _plain_copy(backend: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
  """A copy without truncation or padding.

  A tokenizer.json may carry such settings (MiniLM's pads to 128) that would fight the
  fixed-length layout built here; copying leaves the caller's tokenizer untouched.
  """
  backend = tokenizers.Tokenizer.from_str(backend.to_str())
  backend.no_truncation()
  backend.no_padding()
  return backend


class TextTokenizer:
  """Texts -> right-padded int32 ids and attention mask of a fixed length.

  Every row is `prefix + tokens(instruction + text)[:budget] + suffix`, where prefix/suffix
  are the special tokens the model expects around a text (BERT: [CLS] ... [SEP]; Mistral:
  <s> ...; decoders used as embedders also end with EOS so last-token pooling reads the
  EOS state). Truncation cuts the text, never the special tokens, so the EOS survives.

  Attributes:
    backend: the `tokenizers.Tokenizer` doing the sub-word split (no truncation/padding).
    pad_id: id written into padding positions (mask 0 there).
    eos_id: the end-of-sequence id appended for decoders (None for BERT-style encoders).
    prefix_ids / suffix_ids: special ids put around every text.
    instruction: text prepended verbatim to every input (include any separator yourself).
    max_len: default row length.
  """

  def __init__(self, backend: tokenizers.Tokenizer, *, pad_id: int, eos_id: int | None = None,
               prefix_ids: Sequence[int] = (), suffix_ids: Sequence[int] = (),
               instruction: str = "", max_len: int = 77):
    self.backend = _plain_copy(backend)
    self.pad_id = int(pad_id)
    self.eos_id = None if eos_id is None else int(eos_id)
    self.prefix_ids = tuple(int(i) for i in prefix_ids)
    self.suffix_ids = tuple(int(i) for i in suffix_ids)
    self.instruction = instruction
    self.max_len = max_len

  @classmethod
  def from_backend(cls, backend: tokenizers.Tokenizer, *, pad_id: int,
                   eos_id: int | None = None, append_eos: bool = False, instruction: str = "",
                   max_len: int = 77) -> TextTokenizer:
    """Reads prefix/suffix special tokens off the backend's own post-processor.

    Args:
      backend: a tokenizer whose post-processor adds the model's usual special tokens.
      pad_id: padding id.
      eos_id: end-of-sequence id.
      append_eos: end every row with `eos_id` (decoders pooled at the last/EOS token) unless
        the post-processor already does.
      instruction: prefix text.
      max_len: default row length.
    """
    encoding = _plain_copy(backend).encode("a", add_special_tokens=True)
    content = [i for i, special in enumerate(encoding.special_tokens_mask) if not special]
    ids = encoding.ids
    prefix_ids = ids[:content[0]]
    suffix_ids = ids[content[-1] + 1:]
    if append_eos:
      if eos_id is None:
        raise ValueError("append_eos needs an eos_id")
      if not suffix_ids or suffix_ids[-1] != eos_id:
        suffix_ids = [*suffix_ids, eos_id]
    return cls(backend, pad_id=pad_id, eos_id=eos_id, prefix_ids=prefix_ids,
               suffix_ids=suffix_ids, instruction=instruction, max_len=max_len)

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode_batch(self, texts: Sequence[str],
                   max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes a batch.

    Args:
      texts: B strings.
      max_len: row length L (defaults to `self.max_len`).

    Returns:
      ids int32 [B, L] (padding = pad_id) and mask int32 [B, L] (1 = real token), right
      padded.
    """
    if isinstance(texts, str):
      raise TypeError("encode_batch takes a sequence of strings, not one string")
    max_len = self.max_len if max_len is None else max_len
    budget = max_len - len(self.prefix_ids) - len(self.suffix_ids)
    if budget < 1:
      raise ValueError(f"max_len={max_len} leaves no room for text between "
                       f"{len(self.prefix_ids)} + {len(self.suffix_ids)} special tokens")
    encodings = self.backend.encode_batch([self.instruction + t for t in texts],
                                          add_special_tokens=False)
    ids_BxL = np.full((len(texts), max_len), self.pad_id, dtype=np.int32)
    mask_BxL = np.zeros((len(texts), max_len), dtype=np.int32)
    for row, encoding in enumerate(encodings):
      tokens = [*self.prefix_ids, *encoding.ids[:budget], *self.suffix_ids]
      ids_BxL[row, :len(tokens)] = tokens
      mask_BxL[row, :len(tokens)] = 1
    return ids_BxL, mask_BxL

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
