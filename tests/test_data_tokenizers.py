"""ClipBpeTokenizer (HF tokenizers) against a naive port of open_clip's SimpleTokenizer."""
import gzip
import html
import json
import tarfile

import ftfy
import numpy as np
import pytest
import regex as re

from vlpre.data import tokenizers
from vlpre.llm import assets


class NaiveClipTokenizer:
  """Line-by-line port of open_clip.tokenizer.SimpleTokenizer (clean="lower").

  open_clip itself is not imported: it imports torch. Kept deliberately naive (python BPE
  loop) so it is an independent reference, not a copy of the code under test.
  """

  def __init__(self, bpe_path):
    self.byte_encoder = tokenizers.bytes_to_unicode()
    merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = merges[1:49152 - 256 - 2 + 1]
    merges = [tuple(merge.split()) for merge in merges]
    vocab = list(tokenizers.bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    for merge in merges:
      vocab.append("".join(merge))
    special_tokens = ["<start_of_text>", "<end_of_text>"]
    vocab.extend(special_tokens)
    self.encoder = dict(zip(vocab, range(len(vocab))))
    self.bpe_ranks = dict(zip(merges, range(len(merges))))
    self.cache = {t: t for t in special_tokens}
    special = "|".join(special_tokens)
    self.pat = re.compile(
        special + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", re.IGNORECASE)
    self.sot, self.eot = self.encoder["<start_of_text>"], self.encoder["<end_of_text>"]

  def bpe(self, token):
    if token in self.cache:
      return self.cache[token]
    word = tuple(token[:-1]) + (token[-1] + "</w>",)
    pairs = {(a, b) for a, b in zip(word[:-1], word[1:])}
    if not pairs:
      return token + "</w>"
    while True:
      bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
      if bigram not in self.bpe_ranks:
        break
      first, second = bigram
      new_word = []
      i = 0
      while i < len(word):
        try:
          j = word.index(first, i)
          new_word.extend(word[i:j])
          i = j
        except ValueError:
          new_word.extend(word[i:])
          break
        if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
          new_word.append(first + second)
          i += 2
        else:
          new_word.append(word[i])
          i += 1
      word = tuple(new_word)
      if len(word) == 1:
        break
      pairs = {(a, b) for a, b in zip(word[:-1], word[1:])}
    word = " ".join(word)
    self.cache[token] = word
    return word

  def encode(self, text):
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    text = " ".join(text.split()).strip().lower()
    ids = []
    for token in re.findall(self.pat, text):
      token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
      ids.extend(self.encoder[t] for t in self.bpe(token).split(" "))
    return ids

  def tokenize(self, texts, context_length):
    result = np.zeros((len(texts), context_length), np.int64)
    for i, text in enumerate(texts):
      tokens = [self.sot] + self.encode(text) + [self.eot]
      if len(tokens) > context_length:
        tokens = tokens[:context_length]
        tokens[-1] = self.eot
      result[i, :len(tokens)] = tokens
    return result


@pytest.fixture(scope="module")
def naive():
  return NaiveClipTokenizer(tokenizers.clip_bpe_path())


@pytest.fixture(scope="module")
def clip_tok():
  return tokenizers.get_tokenizer("clip_bpe")


@pytest.fixture(scope="module")
def flickr_captions(data_dir):
  captions = []
  with tarfile.open(f"{data_dir}/flickr8k/val-00000.tar") as tf:
    for member in tf:
      if member.name.endswith(".json"):
        captions += json.load(tf.extractfile(member))["captions"]
      if len(captions) >= 300:
        break
  return captions


def test_vocab_matches_open_clip_layout(clip_tok):
  assert clip_tok.vocab_size == 49408
  hf = clip_tok.hf_tokenizer
  assert hf.get_vocab_size() == 49408
  assert hf.token_to_id("<start_of_text>") == 49406
  assert hf.token_to_id("<end_of_text>") == 49407
  assert hf.token_to_id("!") == 0 and hf.token_to_id("!</w>") == 256
  assert clip_tok.pad_id == 0


def test_parity_on_flickr_captions(clip_tok, naive, flickr_captions):
  ids, mask = clip_tok.encode_batch(flickr_captions, 77)
  want = naive.tokenize(flickr_captions, 77)
  assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (len(flickr_captions), 77)
  np.testing.assert_array_equal(ids, want)
  lengths = [len(naive.encode(c)) + 2 for c in flickr_captions]
  np.testing.assert_array_equal(mask.sum(1), np.minimum(lengths, 77))


TRICKY = [
    "A dog's ball isn't RED, it's blue!!",
    "  Two   spaces\tand\nnewlines  ",
    "Café déjà vu — naïve façade",
    "Numbers 12345 and 3.14159 and 1,000,000",
    "emoji 🐶🐱 and CJK 犬と猫",
    "html &amp; entities &lt;b&gt; and &amp;amp;",
    "mojibake: â€œquotedâ€\x9d",
    "literal <end_of_text> inside and <start_of_text>",
    "",
    "a" * 300,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]


def test_parity_on_tricky_strings(clip_tok, naive):
  np.testing.assert_array_equal(clip_tok.encode_batch(TRICKY, 77)[0], naive.tokenize(TRICKY, 77))
  np.testing.assert_array_equal(clip_tok.encode_batch(TRICKY, 16)[0], naive.tokenize(TRICKY, 16))


def test_truncation_keeps_eot_and_mask(clip_tok):
  long_text = " ".join(["tree"] * 100)
  ids, mask = clip_tok.encode_batch([long_text, "a dog"], 10)
  assert ids[0, 0] == 49406 and ids[0, -1] == 49407 and mask[0].sum() == 10
  assert list(ids[1, :4]) == [49406, clip_tok.hf_tokenizer.token_to_id("a</w>"),
                              clip_tok.hf_tokenizer.token_to_id("dog</w>"), 49407]
  assert list(mask[1]) == [1] * 4 + [0] * 6 and (ids[1, 4:] == 0).all()
  single_ids, _ = clip_tok.encode_batch(["a dog"], 10)
  np.testing.assert_array_equal(single_ids[0], ids[1])  # the 1-text fast path agrees


def test_decode_round_trip(clip_tok):
  ids, _ = clip_tok.encode_batch(["A little girl climbing into a wooden playhouse ."], 77)
  assert clip_tok.decode(ids[0]) == "a little girl climbing into a wooden playhouse ."


def test_pickle_is_small_and_works(clip_tok):
  import pickle
  blob = pickle.dumps(clip_tok)
  assert len(blob) < 2000  # the path, not the vocab
  np.testing.assert_array_equal(pickle.loads(blob).encode_batch(["a cat"], 8)[0],
                                clip_tok.encode_batch(["a cat"], 8)[0])


def test_registry(clip_tok):
  assert isinstance(clip_tok, tokenizers.Tokenizer)

  class Dummy:
    vocab_size, pad_id, bos_id, eos_id, special_ids = 10, 0, None, None, frozenset()

    def __init__(self, scale=1):
      self.scale = scale

    def encode(self, text):
      return [1] * len(text)

    def encode_batch(self, texts, max_len):
      return np.zeros((len(texts), max_len), np.int32), np.zeros((len(texts), max_len), np.int32)

    def decode(self, ids, skip_special_tokens=True):
      return ""

    def token_to_id(self, token):
      return None

  tokenizers.register_tokenizer("test_dummy", Dummy)
  try:
    tok = tokenizers.get_tokenizer("test_dummy", scale=3)
    assert tok.scale == 3 and isinstance(tok, tokenizers.Tokenizer)
    with pytest.raises(ValueError, match="already registered"):
      tokenizers.register_tokenizer("test_dummy", lambda: None)
  finally:
    tokenizers._REGISTRY.pop("test_dummy", None)
  with pytest.raises(KeyError, match="clip_bpe"):
    tokenizers.get_tokenizer("nope")


# ------------------------------------------------------------------------ the protocol


def _built_tokenizers():
  """Every kind of tokenizer vlpre builds: each registered one, and the TextTokenizer of a
  GGUF decoder (SmolLM2) and of a Hugging Face folder encoder (MiniLM, BERT-style)."""
  built = {name: tokenizers.get_tokenizer(name) for name in tokenizers.registered_tokenizers()}
  for name in ("smollm2-135m", "minilm-l6"):
    built[name] = assets.read_source(name).tokenizer
  return built


def test_every_tokenizer_implements_the_whole_protocol():
  for name, tok in _built_tokenizers().items():
    assert isinstance(tok, tokenizers.Tokenizer), name
    ids_BxL, mask_BxL = tok.encode_batch(["a dog runs", "two cats"], 12)
    assert ids_BxL.shape == mask_BxL.shape == (2, 12) and ids_BxL.dtype == np.int32, name
    text_ids = tok.encode("a dog runs")
    assert text_ids and not set(text_ids) & tok.special_ids, name
    row = ids_BxL[0, :mask_BxL[0].sum()].tolist()
    assert [i for i in row if i not in tok.special_ids] == text_ids, (name, row, text_ids)
    if tok.bos_id is not None:
      assert row[0] == tok.bos_id and tok.bos_id in tok.special_ids, name
    if tok.eos_id is not None:
      assert tok.eos_id in tok.special_ids, name
    assert tok.decode(row).strip().lower() == "a dog runs", name
    assert all(isinstance(getattr(tok, a), int) for a in ("vocab_size", "pad_id")), name


def test_clip_and_smollm2_protocol_values():
  built = _built_tokenizers()
  clip, smollm2 = built["clip_bpe"], built["smollm2-135m"]
  assert (clip.vocab_size, clip.pad_id, clip.bos_id, clip.eos_id) == (49408, 0, 49406, 49407)
  assert clip.special_ids == {49406, 49407}
  assert clip.token_to_id("<end_of_text>") == 49407 and clip.token_to_id("no such") is None
  ids = clip.encode_batch(["a dog"], 8)[0][0].tolist()
  assert clip.decode(ids, skip_special_tokens=False) == "<start_of_text>a dog <end_of_text>"
  # ids past the vocabulary (LCL's image tokens) have no text; decoding ends at the EOS
  assert clip.decode([49408, 49409] + ids[1:] + [320]) == "a dog"
  # SmolLM2: <|im_end|> (id 2) ends texts and pads; no BOS (packaged asset's settings)
  assert (smollm2.vocab_size, smollm2.pad_id, smollm2.bos_id, smollm2.eos_id) == (49152, 2, None, 2)
  assert smollm2.special_ids == {2} and smollm2.token_to_id("<|im_end|>") == 2
  assert smollm2.encode("<|im_start|>user") == [1, 4093]
  ids_BxL, mask_BxL = smollm2.encode_batch(["a dog"], 8)
  assert ids_BxL[0, :mask_BxL[0].sum()].tolist() == [*smollm2.encode("a dog"), 2]
  minilm = built["minilm-l6"]  # BERT-style: [CLS] text [SEP], no EOS
  assert minilm.eos_id is None and minilm.bos_id == minilm.token_to_id("[CLS]")
  assert minilm.special_ids == {minilm.token_to_id("[CLS]"), minilm.token_to_id("[SEP]")}
