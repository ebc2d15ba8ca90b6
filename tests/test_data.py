"""The data pipeline: corpus splits, tokenizers, packing, iterator state, local files."""

import base64
import json

import numpy as np
import pytest

from k2.config import ConfigError
from k2.data import pipeline, stdlib_corpus, tokenizer as tokenizer_lib


class CharTokenizer(tokenizer_lib.Tokenizer):
  """ids = code points + 10; [BOS]=1, [EOS]=2."""

  def __init__(self):
    super().__init__(lambda text: [ord(c) + 10 for c in text], lambda ids: ''.join(chr(i - 10) for i in ids),
                     200, {'[BOS]': 1, '[EOS]': 2}, 'chars')


def test_stdlib_split_is_disjoint_deterministic_and_by_path_hash():
  files = stdlib_corpus.source_files()
  validation = [p for p in files if stdlib_corpus.split_of(p) == 'validation']
  assert 0.02 < len(validation) / len(files) < 0.1
  assert stdlib_corpus.split_of('json/decoder.py') == stdlib_corpus.split_of('json/decoder.py')
  assert not any(p.startswith(('test/', 'site-packages/')) for p in files)


def test_tfds_stdlib_documents_match_the_source_files():
  train, validation = pipeline.documents('train'), pipeline.documents('validation')
  files = stdlib_corpus.source_files()
  assert len(train) + len(validation) <= len(files)  # empty files are skipped
  assert 0 < len(validation) <= sum(stdlib_corpus.split_of(p) == 'validation' for p in files)
  assert isinstance(train[0], str) and len(train[0]) > 0
  with pytest.raises(IndexError):
    train[len(train)]


def test_packing_targets_segments_positions_and_mask():
  docs = ['abcde', 'xy', 'klmnopqrstuvw']
  it = pipeline.lm_batches(docs, CharTokenizer(), batch_size=1, seq_len=6, seed=0, shuffle=False, repeat=False)
  rows = [next(it) for _ in range(3)]
  first = {k: v[0] for k, v in rows[0].items()}
  # [BOS] a b c d e [EOS] -> inputs [BOS] a b c d e, targets a b c d e [EOS]
  code = lambda s: [ord(c) + 10 for c in s]
  np.testing.assert_array_equal(first['inputs'], [1, *code('abcde')])
  np.testing.assert_array_equal(first['targets'], [*code('abcde'), 2])
  np.testing.assert_array_equal(first['segment_ids'], [1] * 6)
  np.testing.assert_array_equal(first['positions'], range(6))
  second = {k: v[0] for k, v in rows[1].items()}
  np.testing.assert_array_equal(second['inputs'][:3], [1, *code('xy')])
  np.testing.assert_array_equal(second['targets'][:3], [*code('xy'), 2])
  np.testing.assert_array_equal(second['segment_ids'][:3], [1, 1, 1])
  assert second['segment_ids'][3] == 2 and second['positions'][3] == 0  # the next document starts fresh
  assert set(np.unique(second['mask'])) <= {0.0, 1.0}
  for row in rows:  # every target is the next token of the same document
    same = row['segment_ids'][0][1:] == row['segment_ids'][0][:-1]
    np.testing.assert_array_equal(row['inputs'][0][1:][same], row['targets'][0][:-1][same])


def test_iterator_state_resumes_at_the_next_batch():
  docs = [f'document number {i} ' * (i + 1) for i in range(40)]
  it = pipeline.lm_batches(docs, CharTokenizer(), batch_size=2, seq_len=16, seed=3)
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  fresh = pipeline.lm_batches(docs, CharTokenizer(), batch_size=2, seq_len=16, seed=3)
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_processes_read_disjoint_documents():
  docs = [chr(ord('a') + i) * 5 for i in range(8)]
  seen = []
  for index in range(2):
    it = pipeline.lm_batches(docs, CharTokenizer(), batch_size=1, seq_len=4, seed=0, shuffle=False, repeat=False,
                             process_index=index, process_count=2)
    tokens = np.concatenate([b['inputs'][0] for b in it])
    seen.append({chr(t - 10) for t in tokens if t > 10})
  assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_local_jsonl_and_text_datasets(tmp_path):
  path = tmp_path / 'docs.jsonl'
  path.write_text('\n'.join(json.dumps({'text': f'doc {i}'}) for i in range(20)) + '\n')
  train, validation = pipeline.documents('train', str(path)), pipeline.documents('validation', str(path))
  assert train[0] == 'doc 0' and validation == ['doc 19'] and len(train) == 19
  (tmp_path / 'bad.jsonl').write_text('{"text": "ok"}\nnot json\n')
  with pytest.raises(ConfigError, match='bad.jsonl:2'):
    pipeline.documents('train', str(tmp_path / 'bad.jsonl'))
  for i in range(3):
    (tmp_path / f'{i}.txt').write_text(f'text file {i}')
  assert pipeline.documents('train', str(tmp_path / '*.txt')) == ['text file 0', 'text file 1']


def test_trained_bpe_round_trips_and_keeps_special_tokens_out_of_text(tmp_path):
  texts = ['def f(x):\n    return x + 1\n', 'class A:\n    pass\n'] * 50
  tok = tokenizer_lib.train_bpe(lambda: iter(texts), 300, str(tmp_path / 'bpe.json'))
  assert tok.vocab_size <= 300 and set(tok.special_tokens) == set(tokenizer_lib.SMALL_SPECIAL_TOKENS)
  text = 'def g(y):\n    return [EOS] + y  # é\n'
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert tok.eos_id not in ids  # special tokens never come from plain text
  assert len(tok.encode('def f(x):\n    return x + 1\n')) < len('def f(x):\n    return x + 1\n') / 2
  again = tokenizer_lib.cached_bpe('key', lambda: iter(texts), 300, str(tmp_path / 'cache'))
  assert tokenizer_lib.cached_bpe('key', lambda: iter(['unused']), 300, str(tmp_path / 'cache')).encode(text) == \
      again.encode(text)


def test_tiktoken_file_in_k2_format(tmp_path):
  # A rank file shaped like K2's: every byte, then merges; special ids follow at K2's offsets.
  ranks = [bytes([b]) for b in range(256)] + [b'he', b'll', b'hell', b'hello', b' w', b'or']
  path = tmp_path / 'tiktoken.model'
  path.write_text(''.join(f'{base64.b64encode(t).decode()} {i}\n' for i, t in enumerate(ranks)))
  tok = tokenizer_lib.load(str(path))
  assert tok.vocab_size == len(ranks) + 256
  offset = len(ranks) - 163584
  assert tok.special_tokens['<|im_end|>'] == 163586 + offset and tok.eos_id == 163585 + offset
  assert tok.encode('hello') == [ranks.index(b'hello')]
  text = 'hello world, 你好 <|im_end|>'
  assert tok.decode(tok.encode(text)) == text
  assert tok.special_tokens['<|im_end|>'] not in tok.encode(text)
  (tmp_path / 'broken.model').write_text('!!! not base64\n')
  with pytest.raises(ConfigError):
    tokenizer_lib.load(str(tmp_path / 'broken.model'))


def test_unigram_loss_is_the_entropy_of_the_targets():
  batch = {'targets': np.array([[1, 1, 2, 3]]), 'mask': np.array([[1.0, 1.0, 1.0, 0.0]])}
  p = np.array([2 / 3, 1 / 3])
  assert pipeline.unigram_loss([batch], 8) == pytest.approx(-(p * np.log(p)).sum())


def test_repeat_fraction_rows_show_their_first_half_twice_and_resume():
  docs = [f'document number {i} ' * (i + 1) for i in range(40)]
  plain = pipeline.lm_batches(docs, CharTokenizer(), batch_size=4, seq_len=16, seed=3)
  mixed = pipeline.lm_batches(docs, CharTokenizer(), batch_size=4, seq_len=16, seed=3, repeat_fraction=0.5)
  repeated = 0
  for _ in range(25):
    want, got = next(plain), next(mixed)
    for r in range(4):
      if (got['inputs'][r] == want['inputs'][r]).all():  # untouched rows are the plain pipeline's rows
        assert all((got[k][r] == want[k][r]).all() for k in want)
        continue
      repeated += 1
      tokens = np.append(got['inputs'][r], got['targets'][r][-1])
      np.testing.assert_array_equal(tokens[:8], want['inputs'][r][:8])  # the row's own first half ...
      np.testing.assert_array_equal(tokens[8:16], tokens[:8])            # ... shown twice, one segment
      np.testing.assert_array_equal(got['targets'][r], tokens[1:])
      assert (got['segment_ids'][r] == 1).all() and (got['mask'][r] == 1).all()
      np.testing.assert_array_equal(got['positions'][r], range(16))
  assert 30 <= repeated <= 70  # of 100 rows at fraction 0.5
  state = mixed.get_state()
  expected = [next(mixed) for _ in range(3)]
  fresh = pipeline.lm_batches(docs, CharTokenizer(), batch_size=4, seq_len=16, seed=3, repeat_fraction=0.5)
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    assert all((got[k] == want[k]).all() for k in want)
  with pytest.raises(ConfigError, match='repeat_fraction'):
    pipeline.lm_batches(docs, CharTokenizer(), batch_size=4, seq_len=16, seed=3, repeat_fraction=1.5)
