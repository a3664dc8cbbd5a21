"""Tests for prepare.py: exact round trips in every tier, the shared split, errors, interrupted writes."""
import base64, collections, errno, hashlib, json, lzma, os, random, re, shutil, signal, subprocess, sys, time
import numpy as np
import pytest
import prepare
from prepare import PrepareError, load_tokenizer, read_documents

LLAMA2 = prepare.LLAMA2_PATH  # the assets shipped in assets/: no test needs a download
SHAKESPEARE = prepare.DATASETS['tinyshakespeare']['path']  # tinyshakespeare.txt.xz
TIERS = [259, 4096, 8192, 16384, 32000]
# spaces at the start, runs of spaces, tabs, digits, accents, CJK, emoji, a lone combining mark
SMALL_DOCS = ['Hello world!', ' a leading space', '   three spaces,  two,\tand a tab', 'Zahl 2024: 3.14159',
              'café naïve façade', '日本語のテキスト', 'emoji 🦙🚀 and e\u0301', 'ends with spaces   ', '\u2028odd line sep']

def shakespeare_text():
    with lzma.open(SHAKESPEARE, 'rt', encoding='utf-8') as f:
        return f.read()

@pytest.fixture(scope='module')
def toks():
    return {n: load_tokenizer(LLAMA2, n) for n in TIERS}

def bin_documents(tier_dir, split, bos_id):
    """The documents of a bin, as id lists, split at each BOS."""
    data = np.fromfile(os.path.join(tier_dir, f'{split}.bin'), dtype=np.uint16)
    starts = np.flatnonzero(data == bos_id).tolist() + [len(data)]
    assert starts[0] == 0, 'a bin starts with BOS'
    return [data[a + 1:b].tolist() for a, b in zip(starts, starts[1:])]

def test_shakespeare_every_tier(tmp_path, toks):
    prepare.prepare(SHAKESPEARE, LLAMA2, TIERS, str(tmp_path), workers=2)
    docs = list(read_documents(SHAKESPEARE))
    expected = {s: [t for k, (_, t) in enumerate(docs) if (k % 20 == 0) == (s == 'val')] for s in ('train', 'val')}
    assert len(expected['val']) == 362 and len(expected['train']) == 6860
    previous = None
    for n in TIERS:
        tier_dir = tmp_path / f'llama2_v{n}'
        meta = json.loads((tier_dir / 'meta.json').read_text())
        assert (meta['vocab_size'], meta['bos_id'], meta['tokenizer']) == (n, 1, os.path.abspath(LLAMA2))
        for s in ('train', 'val'):
            got = bin_documents(tier_dir, s, 1)
            assert max(max(ids) for ids in got) < n
            assert meta[s]['tokens'] == sum(len(ids) + 1 for ids in got)
            assert meta[s]['documents'] == len(expected[s])
            assert meta[s]['bytes'] == sum(len(t.encode()) for t in expected[s])
            # the full file at 4096 and 32000; a sample of documents elsewhere keeps the test fast
            pick = range(len(got)) if n in (4096, 32000) else range(0, len(got), 7)
            for k in pick:
                assert toks[n].decode(got[k]) == expected[s][k], (n, s, k)  # also: the same documents in every tier
        if previous:
            assert meta['train']['tokens'] + meta['val']['tokens'] < previous, 'more pieces, fewer tokens'
        previous = meta['train']['tokens'] + meta['val']['tokens']

def test_line_by_line_encode_is_sentencepiece(toks):
    text = shakespeare_text()
    for n, count in ((4096, 454_410), (32000, 368_633)):  # the whole file, as counted in GROWTH.md section 4
        ids = toks[n].encode(text)
        assert len(ids) == count and ids == toks[n].sp.encode(text)
    for n, tok in toks.items():
        for doc in SMALL_DOCS:
            text = f'\n{doc}\n\n\n {doc}\n  {doc}\n'
            assert tok.encode(text) == tok.sp.encode(text), (n, text)

def test_small_text_round_trips(tmp_path, toks):
    for n, tok in toks.items():
        for doc in SMALL_DOCS:
            ids = tok.encode(doc)
            assert max(ids) < n and tok.decode(ids) == doc, (n, doc)
            assert tok.decode([tok.bos_id] + ids) == doc  # a BOS is dropped
        assert tok.decode(tok.encode(' ')) == ' '
    # the same text through prepare(): a folder of .txt files, each one document
    for k, doc in enumerate(SMALL_DOCS):
        (tmp_path / 'in').mkdir(exist_ok=True)
        (tmp_path / 'in' / f'{k:02d}.txt').write_text(doc, encoding='utf-8')
    prepare.prepare(str(tmp_path / 'in'), LLAMA2, TIERS, str(tmp_path / 'out'), val_fraction=0.25, whole_file=True,
                    workers=1)
    totals = []
    for n in TIERS:
        got = bin_documents(tmp_path / 'out' / f'llama2_v{n}', 'train', 1) + \
            bin_documents(tmp_path / 'out' / f'llama2_v{n}', 'val', 1)
        assert sorted(toks[n].decode(ids) for ids in got) == sorted(SMALL_DOCS)
        totals.append(sum(map(len, got)))
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == len(totals)

@pytest.mark.parametrize('old,new', [(259, 4096), (4096, 8192), (8192, 32000), (4096, 32000)])
def test_old_tier_pieces(toks, old, new):
    tok = toks[new]
    ids = random.Random(old).sample(range(old, new), 300) + list(range(max(old, 29871), min(new, 29900)))
    for i in ids:
        pieces = tok.old_tier_pieces(i, old)
        assert all(p < old for p in pieces), (i, pieces)
        # raw pieces, concatenated; a space spelled in bytes is E2 96 81 ('▁'), as decode_bytes knows
        assert b''.join(tok.token_bytes(p) for p in pieces).replace('▁'.encode(), b' ') == tok.token_bytes(i), i
    byte_ids = lambda b: [3 + c for c in b]  # ids 3..258 are the bytes <0x00>..<0xFF>
    # one leading space for '▁the' and none for 'ing': no dummy prefix mid-text
    assert tok.old_tier_pieces(tok.sp.piece_to_id('▁the'), 259) == byte_ids('▁the'.encode())
    assert tok.old_tier_pieces(tok.sp.piece_to_id('ing'), 259) == byte_ids(b'ing')
    if new == 32000:
        assert tok.old_tier_pieces(29871, old) == byte_ids('▁'.encode())  # a lone space below the full tier

def small_rank_table(path, merges=120):
    """A GPT-2-style .tiktoken rank file: the 256 bytes, then merges learned on tinyshakespeare."""
    text = shakespeare_text()[:200_000]
    words = collections.Counter(tuple(bytes([c]) for c in w.encode()) for w in re.findall(r' ?\w+| ?[^\w\s]+|\s+', text))
    ranks = {bytes([b]): b for b in range(256)}
    for _ in range(merges):
        pairs = collections.Counter()
        for w, c in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += c
        a, b = max(pairs, key=pairs.get)
        ranks[a + b] = len(ranks)
        merged = {}
        for w, c in words.items():
            out, k = [], 0
            while k < len(w):
                if w[k:k + 2] == (a, b):
                    out.append(a + b)
                    k += 2
                else:
                    out.append(w[k])
                    k += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + c
        words = merged
    with open(path, 'wb') as f:
        f.writelines(base64.b64encode(t) + b' %d\n' % r for t, r in ranks.items())
    return len(ranks)

def test_gpt2_family(tmp_path):
    full = small_rank_table(tmp_path / 'ranks.tiktoken') + 1
    tiers = [257, 300, full]
    prepare.prepare(SHAKESPEARE, 'gpt2', tiers, str(tmp_path / 'out'), workers=2, gpt2_ranks=str(tmp_path / 'ranks.tiktoken'))
    docs = [t for _, t in read_documents(SHAKESPEARE)]
    totals = []
    for n in tiers:
        tok = load_tokenizer('gpt2', n, str(tmp_path / 'ranks.tiktoken'))
        assert tok.bos_id == n - 1 and tok.name == 'gpt2'
        got = bin_documents(tmp_path / 'out' / f'gpt2_v{n}', 'train', n - 1)
        assert max(max(ids) for ids in got) < n - 1
        assert [tok.decode(ids) for ids in got[:500]] == [t for k, t in enumerate(docs) if k % 20][:500]
        assert all(tok.decode(tok.encode(d)) == d for d in SMALL_DOCS)
        totals.append(json.loads((tmp_path / 'out' / f'gpt2_v{n}' / 'meta.json').read_text())['train']['tokens'])
        for i in range(257, n - 1):
            pieces = tok.old_tier_pieces(i, 257)
            assert all(p < 256 for p in pieces) and b''.join(tok.token_bytes(p) for p in pieces) == tok.token_bytes(i)
        assert tok.old_tier_pieces(n - 1, 257) == [256], 'the BOS is the old tier\'s BOS'
    assert totals[0] > totals[1] > totals[2]

def test_gutenberg_style_jsonl_val_ids(tmp_path, toks):
    lines = [json.dumps(dict(pg_id=pg, title='t', text=f'Book {pg}.\n\nIt was a dark night ü.')) for pg in (5, 9, 12, 40)]
    with lzma.open(tmp_path / 'books.jsonl.xz', 'wt', encoding='utf-8') as f:
        f.write('\n'.join(lines) + '\n')
    prepare.prepare(str(tmp_path / 'books.jsonl.xz'), LLAMA2, [4096], str(tmp_path), val_ids=[9, 40], workers=1)
    got = bin_documents(tmp_path / 'llama2_v4096', 'val', 1)
    assert [toks[4096].decode(ids) for ids in got] == ['Book 9.\n\nIt was a dark night ü.', 'Book 40.\n\nIt was a dark night ü.']
    with pytest.raises(PrepareError, match=r'\[7\]'):
        prepare.prepare(str(tmp_path / 'books.jsonl.xz'), LLAMA2, [4096], str(tmp_path / 'x'), val_ids=[9, 7], workers=1)

def test_txt_blocks_and_separators(tmp_path, monkeypatch):
    text = 'a\n\nb\n\n\n\nc  \n \n\nd\n\n \t\n \ne\n' * 50 + 'ü' * 9  # a block may end inside '\n \t\n \n'
    (tmp_path / 'x.txt').write_text(text, encoding='utf-8')
    whole = [t for _, t in read_documents(str(tmp_path / 'x.txt'))]
    for block in range(1, 12):  # a separator or a UTF-8 character cut by the block boundary
        monkeypatch.setattr(prepare, 'TXT_BLOCK', block)
        assert [t for _, t in read_documents(str(tmp_path / 'x.txt'))] == whole
    assert whole == [d for d in re.split(r'\n\s*\n', text)]

# -----------------------------------------------------------------------------
# errors, each one line that says what to do

def test_tokenizer_errors(tmp_path):
    with pytest.raises(PrepareError, match='not found'):
        load_tokenizer(str(tmp_path / 'missing.model'), 4096)
    (tmp_path / 'bad.model').write_text('this is not a protobuf\n' * 10)
    with pytest.raises(PrepareError, match='not a SentencePiece'):
        load_tokenizer(str(tmp_path / 'bad.model'), 4096)
    for n in (258, 32001):
        with pytest.raises(PrepareError, match=f'tier {n} is outside 259..32000'):
            load_tokenizer(LLAMA2, n)

def test_input_errors(tmp_path):
    (tmp_path / 'bad.txt').write_bytes('ok text\n\n'.encode() + b'caf\xe9\n')
    with pytest.raises(PrepareError, match=r'bad.txt is not UTF-8 at byte 12'):
        prepare.prepare(str(tmp_path / 'bad.txt'), LLAMA2, [4096], str(tmp_path / 'out'), workers=1)
    with lzma.open(tmp_path / 'bad.jsonl.xz', 'wb') as f:
        f.write(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(PrepareError, match=r'bad.jsonl.xz is not UTF-8 at byte 30'):
        prepare.prepare(str(tmp_path / 'bad.jsonl.xz'), LLAMA2, [4096], str(tmp_path / 'out'), workers=1)
    (tmp_path / 'empty.txt').write_text('\n\n  \n')
    with pytest.raises(PrepareError, match='no documents'):
        prepare.prepare(str(tmp_path / 'empty.txt'), LLAMA2, [4096], str(tmp_path / 'out'), workers=1)
    assert not os.path.exists(tmp_path / 'out' / 'llama2_v4096' / 'train.bin')

BAD_JSONL = [  # (line 4, after a good line and two blank ones, the message)
    ('{"text": "cut', r'line 4 is not JSON \(Unterminated string'),
    ('["a list"]', 'line 4 has no "text" field'),
    ('{"title": "no text"}', 'line 4 has no "text" field'),
    ('{"text": 42}', 'line 4: "text" is 42, not a string'),
    ('{"text": null}', 'line 4: "text" is null, not a string'),
]

@pytest.mark.parametrize('line, message', BAD_JSONL)
def test_bad_jsonl_line_is_one_line_naming_it(tmp_path, line, message):
    (tmp_path / 'in.jsonl').write_text('{"text": "fine"}\n\n  \n' + line + '\n{"text": "also fine"}\n')
    with pytest.raises(PrepareError, match=message) as e:
        prepare.prepare(str(tmp_path / 'in.jsonl'), LLAMA2, [512], str(tmp_path / 'out'), workers=1)
    assert str(e.value).startswith(str(tmp_path / 'in.jsonl')) and '\n' not in str(e.value)

def test_output_in_the_way_is_one_line_and_leaves_nothing(tmp_path):
    (tmp_path / 'in.txt').write_text('one\n\ntwo')
    (tmp_path / 'out').write_text('a file, not a folder')
    with pytest.raises(PrepareError, match=r'cannot write .*out/llama2_v512: Not a directory; pass an --out_dir') as e:
        prepare.prepare(str(tmp_path / 'in.txt'), LLAMA2, [512], str(tmp_path / 'out'), workers=1)
    assert '\n' not in str(e.value) and (tmp_path / 'out').read_text() == 'a file, not a folder'
    assert sorted(os.listdir(tmp_path)) == ['in.txt', 'out']

@pytest.mark.parametrize('fails', ['makedirs', 'open'])
def test_read_only_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, fails):
    """A read-only disk (simulated: the tests may run as root, whom chmod does not stop): the folder or
    the first bin cannot be made. The folders made before it are removed again."""
    (tmp_path / 'in.txt').write_text('one\n\ntwo')
    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
    real_open = open
    if fails == 'makedirs':
        monkeypatch.setattr(os, 'makedirs', read_only)
    else:  # prepare.py writes its bins with open(..., 'wb')
        monkeypatch.setattr(prepare, 'open', lambda path, mode='r', *a, **k: read_only(path) if 'w' in mode
                            else real_open(path, mode, *a, **k), raising=False)
    with pytest.raises(PrepareError, match=r'cannot write .*: Read-only file system; pass an --out_dir on a writable'):
        prepare.prepare(str(tmp_path / 'in.txt'), LLAMA2, [512], str(tmp_path / 'data' / 'out'), workers=1)
    assert os.listdir(tmp_path) == ['in.txt']

def test_offline_download_fails_at_once(tmp_path):
    with pytest.raises(PrepareError, match='offline.*--input FILE'):  # nothing listens on port 9
        prepare.download('http://127.0.0.1:9/input.txt', str(tmp_path / 'input.txt'))
    assert os.listdir(tmp_path) == []

def test_the_defaults_are_shipped_and_need_no_network(tmp_path):
    """The default tokenizer and dataset are the files in assets/, as assets/README.md describes them;
    prepare.py's CLI makes the tinyshakespeare tiers with every download pointed at a dead proxy."""
    assert load_tokenizer('llama2', 512).sha256 == prepare.LLAMA2_SHA256 == prepare.file_sha256(LLAMA2)
    assert hashlib.sha256(shakespeare_text().encode()).hexdigest() == \
        '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed'
    dead = 'http://127.0.0.1:9'
    env = {**os.environ, 'HTTP_PROXY': dead, 'HTTPS_PROXY': dead, 'http_proxy': dead, 'https_proxy': dead}
    r = subprocess.run([sys.executable, 'prepare.py', '--dataset', 'tinyshakespeare', '--tiers', '512',
                        '--out_dir', str(tmp_path), '--workers', '1'], cwd=os.path.dirname(prepare.__file__),
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / 'llama2_v512' / 'meta.json').read_text())
    assert meta['source'] == SHAKESPEARE and meta['tokenizer_sha256'] == prepare.LLAMA2_SHA256

@pytest.mark.parametrize('args, message', [
    (['--workers', '0'], '--workers 0: pass 1 or more'),
    (['--val_fraction', 'nan'], '--val_fraction nan: pass a fraction between 0 and 1'),
    (['--val_ids', '12,abc'], "--val_ids '12,abc': pass pg_id numbers joined by commas")])
def test_bad_arguments_are_one_line_errors_that_write_nothing(tmp_path, args, message):
    """Refused before anything is downloaded (tinystories is; a dead proxy would fail it otherwise)."""
    dead = 'http://127.0.0.1:9'
    env = {**os.environ, 'HTTP_PROXY': dead, 'HTTPS_PROXY': dead, 'http_proxy': dead, 'https_proxy': dead}
    r = subprocess.run([sys.executable, 'prepare.py', '--dataset', 'tinystories', '--tiers', '512',
                        '--out_dir', str(tmp_path / 'out'), *args], cwd=os.path.dirname(prepare.__file__),
                       capture_output=True, text=True, env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith(f'prepare.py: {message}'), r.stderr
    assert not (tmp_path / 'out').exists()

def test_bad_doc_sep_is_one_line(tmp_path):
    (tmp_path / 'in.txt').write_text('one\n\ntwo')
    with pytest.raises(PrepareError, match=r"--doc_sep '\(' is not a valid regex") as e:
        prepare.prepare(str(tmp_path / 'in.txt'), LLAMA2, [512], str(tmp_path / 'out'), doc_sep='(', workers=1)
    assert '\n' not in str(e.value)
    # a capturing group's text would come back from re.split as documents
    with pytest.raises(PrepareError, match=r"has a capturing group; make it \(\?:\.\.\.\)"):
        prepare.prepare(str(tmp_path / 'in.txt'), LLAMA2, [512], str(tmp_path / 'out'), doc_sep=r'(x)?\n\n', workers=1)
    assert not (tmp_path / 'out').exists()

# -----------------------------------------------------------------------------
# interrupted writes and re-runs

def test_leftover_temporary_file_is_not_a_bin(tmp_path):
    (tmp_path / 'in.txt').write_text('one\n\ntwo\n\nthree')
    tier = tmp_path / 'out' / 'llama2_v4096'
    tier.mkdir(parents=True)
    (tier / 'train.bin.tmp').write_bytes(b'\x01\x00' * 3)  # what a killed run leaves behind
    (tier / 'val.bin.tmp').write_bytes(b'')
    prepare.prepare(str(tmp_path / 'in.txt'), LLAMA2, [4096], str(tmp_path / 'out'), val_fraction=0.3, workers=1)
    assert sorted(os.listdir(tier)) == ['meta.json', 'train.bin', 'val.bin']
    assert json.loads((tier / 'meta.json').read_text())['train']['documents'] == 2

def test_failed_worker_fails_run_and_rerun_completes(tmp_path, monkeypatch, capsys):
    (tmp_path / 'in.txt').write_text('\n\n'.join(f'document {k}' for k in range(40)))
    args = (str(tmp_path / 'in.txt'), LLAMA2, [4096, 8192], str(tmp_path / 'out'))
    prepare.prepare(*args, workers=2)
    original = prepare.SentencePieceTokenizer.encode

    def broken(self, text):  # the forked workers inherit this
        if text == 'document 33':
            raise RuntimeError('worker died')
        return original(self, text)
    monkeypatch.setattr(prepare.SentencePieceTokenizer, 'encode', broken)
    with pytest.raises(RuntimeError, match='worker died'):
        prepare.prepare(*args, val_fraction=0.5, workers=2, overwrite=True)  # a new split: both rebuilt, and fail
    tier = tmp_path / 'out' / 'llama2_v4096'
    assert json.loads((tier / 'meta.json').read_text())['split']['val_fraction'] == 0.05, 'the old tier is kept'
    monkeypatch.undo()
    prepare.prepare(*args, val_fraction=0.5, workers=2, overwrite=True)
    assert json.loads((tier / 'meta.json').read_text())['val']['documents'] == 20
    capsys.readouterr()
    mtime = os.path.getmtime(tier / 'train.bin')
    prepare.prepare(*args, val_fraction=0.5, workers=2)
    assert 'complete, skipping' in capsys.readouterr().out and os.path.getmtime(tier / 'train.bin') == mtime

def test_failed_rerun_keeps_the_finished_tier(tmp_path):
    (tmp_path / 'in.txt').write_text('\n\n'.join(f'document {k}' for k in range(10)))
    args = (str(tmp_path / 'in.txt'), LLAMA2, [512], str(tmp_path / 'out'))
    prepare.prepare(*args, workers=1)
    tier = tmp_path / 'out' / 'llama2_v512'
    before = {f: (tier / f).read_bytes() for f in ('meta.json', 'train.bin', 'val.bin')}
    with pytest.raises(PrepareError, match='the val split has no documents'):
        prepare.prepare(*args, val_fraction=0, workers=1, overwrite=True)  # fails after writing the new bins' temp files
    assert {f: (tier / f).read_bytes() for f in os.listdir(tier)} == before

def test_a_complete_tier_of_other_text_or_split_is_kept_unless_overwrite(tmp_path):
    """Runs read a tier by its path: preparing other text (or another split) into it would change what a resumed
    run trains and evaluates on, silently."""
    (tmp_path / 'a').mkdir()
    (tmp_path / 'b').mkdir()
    for d, n in (('a', 10), ('b', 4)):
        (tmp_path / d / 'in.txt').write_text('\n\n'.join(f'document {k} of {d}' for k in range(n)))
    out = str(tmp_path / 'out')
    prepare.prepare(str(tmp_path / 'a' / 'in.txt'), LLAMA2, [512], out, workers=1)
    tier = tmp_path / 'out' / 'llama2_v512'
    before = {f: (tier / f).read_bytes() for f in os.listdir(tier)}
    for source, fraction, what in (('b', 0.05, 'other text'), ('a', 0.5, 'other split')):
        with pytest.raises(PrepareError, match=f'already holds a complete tier of {what} .*pass --overwrite'):
            prepare.prepare(str(tmp_path / source / 'in.txt'), LLAMA2, [512], out, val_fraction=fraction, workers=1)
        assert {f: (tier / f).read_bytes() for f in os.listdir(tier)} == before
    shutil.copytree(tmp_path / 'a', tmp_path / 'moved')  # the same text elsewhere (a clone moved): skipped
    prepare.prepare(str(tmp_path / 'moved' / 'in.txt'), LLAMA2, [512], out, workers=1)
    assert {f: (tier / f).read_bytes() for f in os.listdir(tier)} == before
    prepare.prepare(str(tmp_path / 'b' / 'in.txt'), LLAMA2, [512], out, workers=1, overwrite=True)
    assert json.loads((tier / 'meta.json').read_text())['source'] == str(tmp_path / 'b' / 'in.txt')

def test_inspect(tmp_path, capsys):
    (tmp_path / 'in.txt').write_text('To be, or not to be.\n\nThat is the question.')
    prepare.prepare(str(tmp_path / 'in.txt'), LLAMA2, [4096], str(tmp_path), val_fraction=0.5, workers=1)
    prepare.inspect(str(tmp_path / 'llama2_v4096'), LLAMA2)
    out = capsys.readouterr().out
    assert 'bytes/token' in out and 'To be, or not to be.' in out

DAMAGED_BINS = [  # (split, what happens to its bytes, the message)
    ('train', lambda b: b[:6], 'train.bin has 6 bytes but meta.json says'),  # cut between tokens
    ('val', lambda b: b[:7], 'val.bin has 7 bytes'),  # mid-token: numpy would refuse to map it
    ('val', lambda b: b'', 'val.bin has 0 bytes'),
    ('train', lambda b: b[:-2] + b'\xff\xff', 'train.bin has id 65535, beyond tier 4096'),
]

@pytest.mark.parametrize('split, damage, message', DAMAGED_BINS)
def test_inspect_refuses_a_bin_that_does_not_match_meta(tmp_path, split, damage, message):
    (tmp_path / 'in.txt').write_text('To be, or not to be.\n\nThat is the question.')
    prepare.prepare(str(tmp_path / 'in.txt'), LLAMA2, [4096], str(tmp_path), val_fraction=0.5, workers=1)
    path = tmp_path / 'llama2_v4096' / f'{split}.bin'
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(PrepareError, match=message) as e:
        prepare.inspect(str(tmp_path / 'llama2_v4096'), LLAMA2)
    assert '\n' not in str(e.value) and str(e.value).endswith('re-run prepare.py')


def test_inspect_a_folder_that_is_no_tier(tmp_path):
    with pytest.raises(PrepareError, match=r'no prepared data in .* \(no meta.json\): run prepare.py for that tier'):
        prepare.inspect(str(tmp_path), LLAMA2)


@pytest.fixture
def tier(tmp_path):
    (tmp_path / 'in.txt').write_text('To be, or not to be.\n\nThat is the question.')
    prepare.prepare(str(tmp_path / 'in.txt'), LLAMA2, [4096], str(tmp_path), val_fraction=0.5, workers=1)
    return tmp_path / 'llama2_v4096'


def test_open_tier_gives_meta_and_bins(tier):
    meta, bins = prepare.open_tier(str(tier))
    assert meta == json.loads((tier / 'meta.json').read_text()) and set(bins) == {'train', 'val'}
    for s, data in bins.items():
        assert isinstance(data, np.memmap) and np.array_equal(data, np.fromfile(tier / f'{s}.bin', dtype=np.uint16))


def without(key):
    return lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != key})

BROKEN_TIERS = [  # (file, what happens to it, the message): what a run checks before it trusts the bins
    *[(f'{split}.bin', damage, message) for split, damage, message in DAMAGED_BINS],
    ('meta.json', None, 'no prepared data in'),  # None: deleted
    ('meta.json', lambda text: text[:40], r'meta.json is broken \(Unterminated string'),
    ('meta.json', lambda text: '[1, 2]', r'meta.json is broken \(no "tokenizer"\)'),
    ('meta.json', without('vocab_size'), r'meta.json is broken \(no "vocab_size"\)'),
    ('val.bin', None, 'val.bin is missing'),
    ('train.bin', lambda b: b * 2, 'train.bin has .* bytes but meta.json says'),
]


@pytest.mark.parametrize('name, damage, message', BROKEN_TIERS)
def test_open_tier_refuses_a_tier_that_does_not_match_its_meta(tier, name, damage, message):
    path = tier / name
    if damage is None:
        path.unlink()
    elif name.endswith('.json'):
        path.write_text(damage(path.read_text()))
    else:
        path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(PrepareError, match=message) as e:
        prepare.open_tier(str(tier))
    assert '\n' not in str(e.value) and 'run prepare.py' in str(e.value)


def test_a_tokenizer_given_by_path_is_recorded_by_absolute_path(tmp_path, monkeypatch):
    """Later commands load meta.json's tokenizer from any folder, with no download (offline here)."""
    monkeypatch.setattr(prepare, 'CACHE', str(tmp_path / 'empty_cache'))
    (tmp_path / 'in.txt').write_text('one\n\ntwo\n\nthree')
    monkeypatch.chdir(os.path.dirname(os.path.abspath(LLAMA2)))
    prepare.prepare(str(tmp_path / 'in.txt'), os.path.basename(LLAMA2), [512], str(tmp_path), val_fraction=0.5, workers=1)
    meta = json.loads((tmp_path / 'llama2_v512' / 'meta.json').read_text())
    assert meta['tokenizer'] == os.path.abspath(LLAMA2)
    monkeypatch.chdir(tmp_path)
    assert load_tokenizer(meta['tokenizer'], 512, sha256=meta['tokenizer_sha256']).vocab_size == 512

def test_a_tokenizer_other_than_the_recorded_one_is_refused():
    right = load_tokenizer(LLAMA2, 512)
    assert load_tokenizer(LLAMA2, 512, sha256=right.sha256).sha256 == right.sha256
    with pytest.raises(PrepareError, match='is not the tokenizer file the data or checkpoint was made with'):
        load_tokenizer(LLAMA2, 512, sha256='0' * 64)


def descendants(pid):
    """Pids of the live processes below pid (from /proc: each stat holds the parent's pid)."""
    children = collections.defaultdict(list)
    for entry in filter(str.isdigit, os.listdir('/proc')):
        try:
            state, ppid = open(f'/proc/{entry}/stat').read().rsplit(')', 1)[1].split()[:2]
        except (OSError, ValueError):
            continue  # not a process, or gone
        if state != 'Z':
            children[int(ppid)].append(int(entry))
    found, todo = [], [pid]
    while todo:
        found += children[todo[-1]]
        todo += children[todo.pop()]
    return found


def alive(pid):
    try:
        return open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[0] != 'Z'  # a zombie has exited
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='PR_SET_PDEATHSIG is Linux only')
def test_killed_prepare_takes_its_workers_with_it(tmp_path):
    with open(tmp_path / 'big.txt', 'w', encoding='utf-8') as f:  # 20 MB: tokenizing takes far longer than the test
        f.write(shakespeare_text() * 20)
    proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), 'prepare.py'), '--input',
                             str(tmp_path / 'big.txt'), '--tokenizer', LLAMA2, '--tiers', '512', '4096',
                             '--out_dir', str(tmp_path / 'out'), '--workers', '2'],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.time() + 60
        while len(workers := descendants(proc.pid)) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert len(workers) >= 2, 'the workers never started'
        time.sleep(1)  # past the workers' start-up
        proc.kill()
        proc.wait()
        deadline = time.time() + 10
        while any(map(alive, workers)) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(map(alive, workers)), f'workers {[w for w in workers if alive(w)]} outlived prepare.py'
    finally:
        proc.kill()
        for w in workers:  # the test's own cleanup, when it failed
            if alive(w):
                os.kill(w, signal.SIGKILL)
