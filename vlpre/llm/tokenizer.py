"""Fixed-length batch tokenization for vlpre's LLMs and frozen text encoders.

`TextTokenizer` implements vlpre's one tokenizer protocol (vlpre.data.tokenizers.Tokenizer)
structurally: this module does not import the data side.
"""
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

  Every row is `prefix + tokens(template with the text in it) + suffix`, where prefix /
  suffix are the special tokens the model expects around a text (BERT: [CLS] ... [SEP];
  Mistral: <s> ...; decoders used as plain embedders also end with EOS so last-token
  pooling reads the EOS state). The template places the text anywhere, e.g. PromptEOL's
  `This sentence : "{text}" means in one word:"`. Truncation cuts the text, never the
  template or the special tokens.

  Attributes:
    backend: the `tokenizers.Tokenizer` doing the sub-word split (no truncation/padding).
    pad_id: id written into padding positions (mask 0 there).
    eos_id: the model's end-of-sequence id, appended for decoders used as embedders or
      trained (None for BERT-style encoders); it ends a generation.
    prefix_ids / suffix_ids: special ids put around every text.
    bos_id: the first of prefix_ids (None: rows start with the text).
    special_ids: prefix_ids, suffix_ids and eos_id (the protocol's).
    template: a string with one "{text}", e.g. an instruction prefix "Query: {text}".
    max_len: default row length.
  """

  def __init__(self, backend: tokenizers.Tokenizer, *, pad_id: int, eos_id: int | None = None,
               prefix_ids: Sequence[int] = (), suffix_ids: Sequence[int] = (),
               template: str = "{text}", max_len: int = 77):
    if template.count("{text}") != 1:
      raise ValueError(f"template must contain exactly one {{text}}, got {template!r}")
    self.backend = _plain_copy(backend)
    self.pad_id = int(pad_id)
    self.eos_id = None if eos_id is None else int(eos_id)
    self.prefix_ids = tuple(int(i) for i in prefix_ids)
    self.suffix_ids = tuple(int(i) for i in suffix_ids)
    self.bos_id = self.prefix_ids[0] if self.prefix_ids else None
    self.special_ids = frozenset(
        [*self.prefix_ids, *self.suffix_ids, *([] if self.eos_id is None else [self.eos_id])])
    self.template = template
    self._before, self._after = template.split("{text}")
    self.max_len = max_len

  @classmethod
  def from_backend(cls, backend: tokenizers.Tokenizer, *, pad_id: int,
                   eos_id: int | None = None, append_eos: bool = False,
                   template: str = "{text}", max_len: int = 77) -> TextTokenizer:
    """Reads prefix/suffix special tokens off the backend's own post-processor.

    Args:
      backend: a tokenizer whose post-processor adds the model's usual special tokens.
      pad_id: padding id.
      eos_id: end-of-sequence id.
      append_eos: end every row with `eos_id` (decoders pooled at the last/EOS token) unless
        the post-processor already does.
      template: where the text goes, see the class docstring.
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
               suffix_ids=suffix_ids, template=template, max_len=max_len)

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """Ids of `text` alone: no prefix/suffix, no template (special tokens written in the
    text, e.g. a chat format's "<|im_start|>", are still recognised)."""
    return self.backend.encode(text, add_special_tokens=False).ids

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
    ids_BxL = np.full((len(texts), max_len), self.pad_id, dtype=np.int32)
    mask_BxL = np.zeros((len(texts), max_len), dtype=np.int32)
    for row, ids in enumerate(self._encode_templated(list(texts), budget)):
      tokens = [*self.prefix_ids, *ids, *self.suffix_ids]
      ids_BxL[row, :len(tokens)] = tokens
      mask_BxL[row, :len(tokens)] = 1
    return ids_BxL, mask_BxL

  def _encode_templated(self, texts: list[str], budget: int) -> list[list[int]]:
    """Token ids of each templated text, at most `budget` long, cutting only the text.

    The whole templated string is tokenised at once (BPE merges across the template's
    edges as the model saw them in training); a text too long is cut at the character
    where its `budget - template`-th token ends and the string re-tokenised.
    """
    if self.template == "{text}":
      return [e.ids[:budget] for e in self.backend.encode_batch(texts, add_special_tokens=False)]
    full = self.backend.encode_batch([self._before + t + self._after for t in texts],
                                     add_special_tokens=False)
    out = []
    for text, encoding in zip(texts, full):
      ids = encoding.ids
      if len(ids) > budget:
        text_tokens = self.backend.encode(text, add_special_tokens=False)
        keep = budget - (len(ids) - len(text_tokens.ids))
        while len(ids) > budget:
          if keep < 1:
            raise ValueError(f"max_len leaves no room for text in template {self.template!r}")
          cut = text_tokens.offsets[keep - 1][1]
          ids = self.backend.encode(self._before + text[:cut] + self._after,
                                    add_special_tokens=False).ids
          keep -= 1
      out.append(ids)
    return out

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self.backend.token_to_id(token)
