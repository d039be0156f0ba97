"""Captioning scores as the COCO caption evaluation computes them: BLEU-1..4 and CIDEr-D.

Pure Python, written from coco-caption's scorers (pycocoevalcap `bleu/bleu_scorer.py`
and `cider/cider_scorer.py`) so that the numbers are theirs, quirks included; the tests
check equality with pycocoevalcap to 1e-9.

`bleu` and `cider` take text that is already tokenised (tokens split on whitespace), as
coco-caption's scorers do; `score` tokenises first with `tokenize`, as `COCOEvalCap`
does with its PTBTokenizer. Candidates map a key (an image) to one caption, references
map the same keys to a list of captions.
"""
from __future__ import annotations

import collections
import math
import re
from typing import Hashable, Mapping, Sequence

NGRAM_ORDER = 4
CIDER_SIGMA = 6.0

# coco-caption's PTBTokenizer runs Stanford's PTBTokenizer with `-lowerCase` and then
# drops these tokens. The bracket tokens are listed upper-case but arrive lower-cased,
# so `-lrb-` / `-rrb-` survive into the scored text there; they survive here too.
_REMOVED = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                      ".", "?", "!", ",", ":", "-", "--", "...", ";"])
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
                "wanna": ("wan", "na")}
_KEPT_WITH_APOSTROPHE = frozenset(["o'clock", "'n'"])
_ALNUM = r"[^\W_]"
_TOKEN = re.compile("|".join([
    rf"\d+(?:[.,:/]\d+)+(?:-{_ALNUM}+)*",                # 3.5  10,000  2:30  1/2  3.5-inch
    rf"{_ALNUM}+(?:[-.]{_ALNUM}+)*\.(?:com|org|net|edu|gov)(?!{_ALNUM})",  # statefarm.com
    rf"(?:{_ALNUM}\.){{2,}}|(?<!{_ALNUM}){_ALNUM}\.(?=\s|$)",  # u.s.  e.g.  p.m.  an initial "x."
    rf"(?:mr|mrs|ms|dr|st|jr|sr|mt|vs)\.(?=\s|$)",        # abbreviations PTB keeps whole
    r"'n'|(?:n't|'s|'re|'ve|'ll|'d|'m)(?!\w)",            # clitics already split off: "man 's"
    rf"{_ALNUM}+(?:[-/']{_ALNUM}+)*",                     # t-shirt  over-the-top  and/or  man's
    r"\.\.\.|--|\S",                                      # any other character is a token
]))
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")


def tokenize(text: str) -> list[str]:
  """Lower-cased PTB-style tokens with punctuation removed, as coco-caption scores them.

  Matches Stanford PTBTokenizer 3.4.1 (`-preserveLines -lowerCase`) plus coco-caption's
  punctuation filter on plain English captions: on all 35,000 Flickr8k captions in
  ../shared/data the two agree on every caption (tests/test_caption_metrics.py checks
  them against the Java tokenizer where Java is installed). Known differences, none of
  which occur there: PTB's full abbreviation list (only mr., mrs., dr., st., ... and
  letter-dot sequences are kept whole here), its handling of URLs, e-mail addresses,
  emoticons, SGML, and rarer contractions ("'tis", "y'all" split as "y' all"); PTB
  also turns a sentence-final abbreviation into the abbreviation plus ".", which only
  changes a token that is removed anyway.
  """
  tokens = []
  for match in _TOKEN.finditer(text.lower()):
    token = match.group()
    if token in _BRACKETS:
      tokens.append(_BRACKETS[token])
    elif token == '"' or token in _REMOVED:
      continue
    elif token in _SPLIT_WORDS:
      tokens.extend(_SPLIT_WORDS[token])
    elif "'" in token and token not in _KEPT_WITH_APOSTROPHE and (clitic := _CLITIC.match(token)):
      tokens.extend(clitic.groups())  # man's -> man 's, can't -> ca n't
    else:
      tokens.append(token)
  return tokens


def _ngram_counts(text: str, n: int = NGRAM_ORDER) -> collections.Counter:
  """Counts of every 1..n-gram of the whitespace-split `text` (coco-caption's `precook`)."""
  words = text.split()
  return collections.Counter(tuple(words[i:i + k]) for k in range(1, n + 1)
                             for i in range(len(words) - k + 1))


def _check_keys(candidates: Mapping, references: Mapping):
  if candidates.keys() != references.keys():
    raise ValueError("candidates and references must have the same keys")
  if any(len(refs) == 0 for refs in references.values()):
    raise ValueError("every key needs at least one reference caption")


def bleu(candidates: Mapping[Hashable, str],
         references: Mapping[Hashable, Sequence[str]]) -> list[float]:
  """Corpus BLEU-1..4 of tokenised captions, as coco-caption's `Bleu(4)`.

  Per caption: n-gram counts clipped by their largest count in any one reference, and
  the reference length closest to the candidate's (the shorter on a tie). Then clipped
  matches, n-gram totals and lengths are summed over the corpus; BLEU-k is the geometric
  mean of the first k precisions times one corpus-level brevity penalty. The epsilons
  (1e-15 added to matches and the candidate length, 1e-9 to totals and the reference
  length) are coco-caption's: a corpus without any k-gram match scores ~0, not NaN.
  """
  _check_keys(candidates, references)
  tiny, small = 1e-15, 1e-9
  correct, guess = [0] * NGRAM_ORDER, [0] * NGRAM_ORDER
  candidate_len, reference_len = 0, 0
  for key, candidate in candidates.items():
    max_ref_counts: dict[tuple, int] = {}
    ref_lens = []
    for ref in references[key]:
      ref_lens.append(len(ref.split()))
      for ngram, count in _ngram_counts(ref).items():
        max_ref_counts[ngram] = max(max_ref_counts.get(ngram, 0), count)
    length = len(candidate.split())
    candidate_len += length
    reference_len += min((abs(l - length), l) for l in ref_lens)[1]
    for k in range(NGRAM_ORDER):
      guess[k] += max(0, length - k)
    for ngram, count in _ngram_counts(candidate).items():
      correct[len(ngram) - 1] += min(max_ref_counts.get(ngram, 0), count)

  ratio = (candidate_len + tiny) / (reference_len + small)
  brevity_penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
  scores, product = [], 1.0
  for k in range(NGRAM_ORDER):
    product *= (correct[k] + tiny) / (guess[k] + small)
    scores.append(product ** (1 / (k + 1)) * brevity_penalty)
  return scores


def cider(candidates: Mapping[Hashable, str],
          references: Mapping[Hashable, Sequence[str]]) -> float:
  """Corpus CIDEr-D of tokenised captions, as coco-caption's `Cider` (n=4, sigma=6).

  Each caption is a tf-idf vector per n-gram order, the idf being log(number of keys) −
  log(number of keys whose references hold the n-gram), from the evaluated set's
  references alone. Per order: the candidate's weights clipped at each reference's,
  dotted with that reference, over both norms, times a Gaussian length penalty
  exp(−δ²/2σ²); averaged over orders and references, ×10, then over keys. As in
  coco-caption, δ is the difference in bigram counts (its `length` counts 2-grams): the
  difference in words whenever both captions have a word, and an empty caption scores 0.
  """
  _check_keys(candidates, references)
  ref_counts = {key: [_ngram_counts(ref) for ref in refs] for key, refs in references.items()}
  document_frequency: collections.Counter = collections.Counter()
  for counts_per_ref in ref_counts.values():
    document_frequency.update(set().union(*counts_per_ref))
  log_num_docs = math.log(float(len(ref_counts)))

  def tfidf(counts):
    vec = [{} for _ in range(NGRAM_ORDER)]
    for ngram, tf in counts.items():
      vec[len(ngram) - 1][ngram] = tf * (log_num_docs - math.log(max(1.0, document_frequency[ngram])))
    norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
    num_bigrams = sum(tf for ngram, tf in counts.items() if len(ngram) == 2)
    return vec, norms, num_bigrams

  scores = []
  for key, candidate in candidates.items():
    vec, norms, length = tfidf(_ngram_counts(candidate))
    per_order = [0.0] * NGRAM_ORDER
    for counts in ref_counts[key]:
      vec_ref, norms_ref, length_ref = tfidf(counts)
      penalty = math.exp(-(float(length - length_ref) ** 2) / (2 * CIDER_SIGMA ** 2))
      for k in range(NGRAM_ORDER):
        dot = sum(min(w, vec_ref[k].get(g, 0.0)) * vec_ref[k].get(g, 0.0) for g, w in vec[k].items())
        if norms[k] != 0 and norms_ref[k] != 0:
          dot /= norms[k] * norms_ref[k]
        per_order[k] += dot * penalty
    scores.append(sum(per_order) / NGRAM_ORDER / len(ref_counts[key]) * 10.0)
  return sum(scores) / len(scores)


def score(candidates: Mapping[Hashable, str],
          references: Mapping[Hashable, Sequence[str]]) -> dict[str, float]:
  """{"bleu4", "cider"} of raw captions, tokenised with `tokenize` first."""
  cand = {key: " ".join(tokenize(text)) for key, text in candidates.items()}
  refs = {key: [" ".join(tokenize(text)) for text in texts] for key, texts in references.items()}
  return {"bleu4": bleu(cand, refs)[3], "cider": cider(cand, refs)}
