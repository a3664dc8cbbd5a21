"""
Text -> memmapped uint16 token bins, one folder per vocabulary tier.

Each tier N is the Llama 2 SentencePiece model cut to its first N pieces (GROWTH.md section 4):
the same text, encoded with a smaller vocabulary, into more tokens, and id i means the same piece
in every tier. Output: <out_dir>/<tokenizer>_v<N>/{train,val}.bin (each document starts with BOS)
and meta.json with the token and UTF-8 byte counts that bits per byte needs.

The Llama 2 tokenizer ('llama2', the default) and tinyshakespeare are in assets/ (assets/README.md):
they need no download. The other datasets are downloaded once into data/downloads.

$ python prepare.py                                        # tinyshakespeare, tiers 4096..32000
$ python prepare.py --dataset tinystories --workers 16     # also: c4 (one shard of a web corpus)
$ python prepare.py --dataset gutenberg --input PATH/gutenberg_en.jsonl.xz --tiers 4096 8192 16384 32000
  (gutenberg holds out the 16 books of assets/README.md, i.e. --val_ids 159,215,564,600,696,1424,
   1572,1689,2130,2527,2814,8164,11339,28767,50701,51461, and writes to data/gutenberg)
$ python prepare.py --input my_texts/ --tokenizer gpt2 --tiers 8192 50257
$ python prepare.py --inspect data/tinyshakespeare/llama2_v4096
"""
import argparse, base64, codecs, contextlib, gzip, hashlib, json, lzma, math, os, re, sys, time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from fractions import Fraction
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, 'data', 'downloads')
ASSETS = os.path.join(HERE, 'assets')  # shipped with the code: the default tokenizer and dataset (assets/README.md)
LLAMA2_PATH = os.path.join(ASSETS, 'llama2_tokenizer.model')
LLAMA2_SHA256 = '9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347'
BLANK_LINE = r'\n\s*\n'
GUTENBERG_VAL_IDS = [159, 215, 564, 600, 696, 1424, 1572, 1689, 2130, 2527, 2814, 8164, 11339, 28767, 50701, 51461]
DATASETS = {  # path: in assets/; url: downloaded (sha256 None: the server's LFS sha256 is checked if it sends one)
    'tinyshakespeare': dict(path=os.path.join(ASSETS, 'tinyshakespeare.txt.xz')),
    'tinystories': dict(url='https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-train.txt',
                        sha256=None, doc_sep=r'\s*<\|endoftext\|>\s*'),
    'c4': dict(url='https://huggingface.co/datasets/allenai/c4/resolve/main/en/c4-train.00000-of-01024.json.gz', sha256=None),
    'gutenberg': dict(url=None, val_ids=GUTENBERG_VAL_IDS),  # no public URL: pass the asset with --input
}

class PrepareError(Exception):
    """A problem with the user's input, in one line that says what to do; the CLI prints it and exits."""

def file_sha256(path):
    with open(path, 'rb') as f:
        return hashlib.file_digest(f, 'sha256').hexdigest()

def download(url, path, sha256=None):
    """Stream url to path with a progress bar, resuming a partial download, and check its sha256."""
    if os.path.exists(path):
        return path
    import requests
    from tqdm import tqdm
    part = path + '.part'
    have = os.path.getsize(part) if os.path.exists(part) else 0
    try:
        r = requests.get(url, stream=True, timeout=(5, 60), headers={'Range': f'bytes={have}-'} if have else {})
        r.raise_for_status()
        have = have if r.status_code == 206 else 0  # the server ignored the range: start over
        etag = r.headers.get('x-linked-etag', '').strip('"')  # Hugging Face sends an LFS file's sha256 here
        sha256 = sha256 or (etag if re.fullmatch(r'[0-9a-f]{64}', etag) else None)
        total = have + int(r.headers.get('content-length', 0))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(part, 'ab' if have else 'wb') as f, tqdm(total=total, initial=have, unit='B', unit_scale=True,
                                                            desc=os.path.basename(path)) as bar:
            for block in r.iter_content(1 << 20):
                bar.update(f.write(block))
    except requests.RequestException as e:
        raise PrepareError(f'cannot download {url} ({type(e).__name__}); offline? pass a local copy with --input FILE')
    if sha256 and file_sha256(part) != sha256:
        os.remove(part)
        raise PrepareError(f'{url}: sha256 mismatch, the download was removed; run again')
    os.replace(part, path)
    return path

# -----------------------------------------------------------------------------
# tokenizers: every tier of a family shares ids; decode(encode(text)) == text exactly

class Tokenizer:
    """The parts both families share: ids -> bytes through one table, so decoding is exact."""
    def token_bytes(self, i):
        return self.table[i]  # a byte token gives its byte, which may be part of a UTF-8 character

    def decode(self, ids):
        return self.decode_bytes(b''.join(self.table[i] for i in ids)).decode('utf-8', errors='replace')

class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path, vocab_size):
        from sentencepiece import sentencepiece_model_pb2 as pb
        if not os.path.isfile(path):
            raise PrepareError(f'tokenizer {path} not found; pass --tokenizer PATH/tokenizer.model, llama2 or gpt2')
        proto = pb.ModelProto()
        try:  # other bytes either fail to parse or parse into a proto without pieces
            with open(path, 'rb') as f:
                proto.ParseFromString(f.read())
        except Exception:
            proto.Clear()
        if not proto.pieces or proto.trainer_spec.model_type != pb.TrainerSpec.BPE:
            raise PrepareError(f'{path} is not a SentencePiece BPE model; pass the Llama 2 tokenizer.model')
        # the first pieces are <unk> <s> </s> and the 256 bytes (259 for Llama 2): every tier needs them all
        n_special = next(i for i, p in enumerate(proto.pieces) if p.type == p.NORMAL)
        check_vocab_size(vocab_size, n_special, len(proto.pieces), path)
        self.sha256, self.vocab_size, self.full_proto = file_sha256(path), vocab_size, proto
        self.name = 'llama2' if self.sha256 == LLAMA2_SHA256 else os.path.splitext(os.path.basename(path))[0]
        self.bos_id = proto.trainer_spec.bos_id
        self.sp = self.truncated(vocab_size, dummy_prefix=True)
        self.sp_lines = None if any('\n' in p.piece for p in proto.pieces) else self.truncated(vocab_size, False)
        self.table = [bytes([int(p.piece[3:5], 16)]) if p.type == p.BYTE else
                      b'' if p.type in (p.CONTROL, p.UNKNOWN) else p.piece.replace('▁', ' ').encode()
                      for p in proto.pieces[:vocab_size]]
        self._old_tiers = {}

    def truncated(self, n, dummy_prefix):
        """Normal pieces are in merge order and split into lower ids, so the first n form a valid BPE model."""
        import sentencepiece as spm
        proto = type(self.full_proto)()
        proto.CopyFrom(self.full_proto)
        del proto.pieces[n:]
        proto.normalizer_spec.add_dummy_prefix = dummy_prefix
        return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

    def encode(self, text):
        # SentencePiece slows down on long strings (3x on a book). No piece holds a newline, so no merge crosses
        # one, and encoding line by line (the first line with the dummy prefix, the rest without) gives the same ids
        if not self.sp_lines:
            return self.sp.encode(text)
        first, *rest = re.split(r'(?<=\n)(?!\n)', text)  # after each run of newlines
        return self.sp.encode(first) + [i for ids in self.sp_lines.encode(rest) for i in ids]

    def decode_bytes(self, b):
        # a space that does not merge at this tier falls back to the bytes of '▁' (E2 96 81); they mean a
        # space, and the first space is the dummy prefix that encode adds (Llama 2 spells a literal '▁' as space)
        b = b.replace('▁'.encode(), b' ')
        return b[1:] if b.startswith(b' ') and self.full_proto.normalizer_spec.add_dummy_prefix else b

    def old_tier_pieces(self, i, old_vocab_size):
        """Ids that tier old_vocab_size makes of token i's text mid-text (no dummy prefix; '▁the' stays one
        leading space). A lone character above the old tier comes out in byte tokens, a space as E2 96 81."""
        if i < old_vocab_size:
            return [i]
        if old_vocab_size not in self._old_tiers:
            self._old_tiers[old_vocab_size] = self.truncated(old_vocab_size, dummy_prefix=False)
        return self._old_tiers[old_vocab_size].encode(self.full_proto.pieces[i].piece.replace('▁', ' '))

class TiktokenTokenizer(Tokenizer):
    """GPT-2's BPE cut to rank < N-1. Its <|endoftext|> becomes the BOS at id N-1, which is GPT-2's own 50256
    at the full tier 50257; below that, id N-1 changes meaning between tiers: growth starts the new BOS row
    from the old BOS row (old_tier_pieces), and the old BOS row goes on as the ordinary token N_old-1 (the
    Llama 2 family, whose BOS is 1 in every tier, needs nothing)."""
    def __init__(self, ranks_path, vocab_size):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
        from tiktoken_ext import openai_public
        if ranks_path:  # a .tiktoken rank file, e.g. r50k_base.tiktoken (the same ranks as GPT-2)
            ranks, pat_str = load_tiktoken_bpe(ranks_path), openai_public.r50k_pat_str
        else:
            try:
                spec = openai_public.gpt2()
            except Exception as e:
                raise PrepareError(f'tiktoken could not fetch the GPT-2 ranks ({type(e).__name__}); pass --gpt2_ranks PATH')
            ranks, pat_str = spec['mergeable_ranks'], spec['pat_str']
        check_vocab_size(vocab_size, 257, len(ranks) + 1, ranks_path or 'gpt2')
        canonical = b''.join(base64.b64encode(t) + b' %d\n' % r for t, r in sorted(ranks.items(), key=lambda x: x[1]))
        self.name, self.vocab_size, self.bos_id = 'gpt2', vocab_size, vocab_size - 1
        self.sha256 = hashlib.sha256(canonical).hexdigest()  # equals the sha256 of a .tiktoken file of these ranks
        self.ranks = {t: r for t, r in ranks.items() if r < vocab_size - 1}
        self.enc = tiktoken.Encoding(f'gpt2_v{vocab_size}', pat_str=pat_str, mergeable_ranks=self.ranks,
                                     special_tokens={'<|endoftext|>': self.bos_id})
        self.table = sorted(self.ranks, key=self.ranks.get) + [b'']

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def decode_bytes(self, b):
        return b

    def old_tier_pieces(self, i, old_vocab_size):
        """Byte-level BPE of token i's bytes with the old tier's ranks (what tiktoken does within one piece);
        the BOS, which has no bytes, is the old tier's BOS."""
        if i == self.bos_id:
            return [old_vocab_size - 1]
        if i < old_vocab_size - 1:
            return [i]
        parts = [bytes([c]) for c in self.table[i]]
        while True:
            pairs = [(self.ranks.get(a + b, math.inf), k) for k, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, k = min(pairs, default=(math.inf, 0))  # the lowest rank merges first
            if rank >= old_vocab_size - 1:
                return [self.ranks[p] for p in parts]
            parts[k:k + 2] = [parts[k] + parts[k + 1]]

def check_vocab_size(n, lo, hi, what):
    if not lo <= n <= hi:
        raise PrepareError(f'tier {n} is outside {lo}..{hi}, the sizes that {what} supports; pick tiers in that range')
    if n > 65536:
        raise PrepareError(f'tier {n} does not fit the uint16 bins; pick a tier <= 65536')

def load_tokenizer(path_or_name, vocab_size, gpt2_ranks=None, sha256=None):
    """'llama2' (assets/llama2_tokenizer.model), a SentencePiece .model path, or 'gpt2', cut to vocab_size ids.
    sha256: the file a tier or checkpoint was made with (meta.json, ckpt['data']); another is refused."""
    if path_or_name == 'gpt2':
        tok = TiktokenTokenizer(gpt2_ranks, vocab_size)
    else:
        if path_or_name in (None, 'llama2'):
            path_or_name = LLAMA2_PATH
        tok = SentencePieceTokenizer(path_or_name, vocab_size)
    if sha256 and tok.sha256 != sha256:
        raise PrepareError(f'{path_or_name} is not the tokenizer file the data or checkpoint was made with '
                           f'(sha256 {sha256[:12]}...); pass the right --tokenizer')
    return tok

def tokenizer_record(spec):
    """What meta.json records of --tokenizer: a name prepare.py knows, or the file's absolute path, so that
    train.py, grow.py, sample.py and export.py find the same file from any folder without --tokenizer."""
    return spec if spec in ('llama2', 'gpt2') else os.path.abspath(spec) if spec else 'llama2'

# -----------------------------------------------------------------------------
# documents: streamed from .txt, .jsonl, .jsonl.xz, .json.gz files or a folder of them

OPENERS = {'.xz': lzma.open, '.gz': gzip.open}
TXT_BLOCK = 1 << 24  # bytes read at a time from a .txt file
ONLY_SPACE_LEFT = re.compile(r'\s*\Z')

def input_files(path):
    """The input's files, in a fixed order: path itself, or every file under the folder path."""
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs) if os.path.isdir(path) else [path]

def read_documents(path, doc_sep=BLANK_LINE, whole_file=False):
    """Yield (pg_id or None, text) for every non-blank document, in a fixed order, without reading it all."""
    if not os.path.exists(path):
        raise PrepareError(f'input {path} not found; pass --input FILE_OR_FOLDER')
    for f in input_files(path):
        kind = re.search(r'\.(txt|jsonl?)(\.xz|\.gz)?$', f)
        if not kind and not os.path.isdir(path):
            raise PrepareError(f'{f}: unknown kind of input; pass a .txt, .jsonl, .jsonl.xz or .json.gz file')
        docs = () if not kind else read_txt(f, doc_sep, whole_file) if kind[1] == 'txt' else read_jsonl(f)
        yield from ((pg_id, text) for pg_id, text in docs if text.strip())

def utf8(decoder, data, path, offset, final=False):
    pending = len(decoder.getstate()[0])  # bytes of a character that the previous block cut in two
    try:
        return decoder.decode(data, final)
    except UnicodeDecodeError as e:
        raise PrepareError(f'{path} is not UTF-8 at byte {offset - pending + e.start} '
                           f'(of the uncompressed text); convert it to UTF-8') from None

def read_txt(path, doc_sep, whole_file):
    decoder, buf, offset = codecs.getincrementaldecoder('utf-8')(), '', 0
    with OPENERS.get(os.path.splitext(path)[1], open)(path, 'rb') as f:
        for block in iter(lambda: f.read(TXT_BLOCK), b''):
            buf += utf8(decoder, block, path, offset)
            offset += len(block)
            start = 0
            for m in re.finditer(doc_sep, buf) if not whole_file else ():
                if ONLY_SPACE_LEFT.match(buf, m.end()):
                    break  # only whitespace after it: the separator may go on in the next block
                yield None, buf[start:m.start()]
                start = m.end()
            buf = buf[start:]
        buf += utf8(decoder, b'', path, offset, final=True)
    yield from ((None, d) for d in ([buf] if whole_file else re.split(doc_sep, buf)))

def read_jsonl(path):
    offset = 0
    with OPENERS.get(os.path.splitext(path)[1], open)(path, 'rb') as f:
        for number, line in enumerate(f, 1):  # blank lines count, so the number is the one an editor shows
            text = utf8(codecs.getincrementaldecoder('utf-8')(), line, path, offset, final=True)
            offset += len(line)
            if not text.strip():
                continue
            try:
                doc = json.loads(text.rstrip('\r\n'))  # a line cut mid-string: 'unterminated', not 'newline'
            except json.JSONDecodeError as e:
                raise PrepareError(f'{path} line {number} is not JSON ({e.msg} at column {e.colno}); '
                                   'fix or remove that line') from None
            if not isinstance(doc, dict) or 'text' not in doc:
                raise PrepareError(f'{path} line {number} has no "text" field; give every line one')
            if not isinstance(doc['text'], str):
                raise PrepareError(f'{path} line {number}: "text" is {json.dumps(doc["text"])[:40]}, not a string; '
                                   'make it a string')
            yield doc.get('pg_id'), doc['text']

# -----------------------------------------------------------------------------
# workers tokenize batches of documents for every tier at once: the text is read and sent once

_tokenizers = None

def init_worker(spec, tiers, gpt2_ranks, parent_pid):
    global _tokenizers
    die_with_parent(parent_pid)
    _tokenizers = {n: load_tokenizer(spec, n, gpt2_ranks) for n in tiers}

def die_with_parent(parent_pid):
    """A killed prepare.py runs no cleanup (SIGKILL, the OOM killer): ask Linux to kill this worker with it,
    or it would go on tokenizing for nobody. Elsewhere the pool's own shutdown is all there is."""
    if sys.platform.startswith('linux'):
        import ctypes, signal
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before the prctl took effect
            os._exit(1)

def encode_batch(batch):
    """[(split, text)] -> {split: (documents, utf8 bytes, {tier: uint16 ids with a BOS per document})}, seconds per tier"""
    out, seconds = {}, {n: 0.0 for n in _tokenizers}
    for split in ('train', 'val'):
        texts = [text for s, text in batch if s == split]
        ids = {}
        for n, tok in _tokenizers.items():
            t0 = time.perf_counter()
            ids[n] = np.array([i for text in texts for i in [tok.bos_id] + tok.encode(text)], dtype=np.uint16)
            seconds[n] += time.perf_counter() - t0
        out[split] = (len(texts), sum(len(text.encode('utf-8')) for text in texts), ids)
    return out, seconds

def batches(docs, val_fraction, val_ids, found_ids, chars=1 << 20):
    """Assign each document to a split and group them into batches of about `chars` characters."""
    batch, size, val_fraction = [], 0, Fraction(str(val_fraction))
    for k, (pg_id, text) in enumerate(docs):
        if val_ids:
            if pg_id is None:
                raise PrepareError('--val_ids needs documents with a pg_id field; use --val_fraction')
            val = pg_id in val_ids
            found_ids.add(pg_id)
        else:  # documents 0, 1/f, 2/f, ... : the same in every run and tier, and at least one
            val = math.ceil((k + 1) * val_fraction) > math.ceil(k * val_fraction)  # exact: a Fraction
        batch.append(('val' if val else 'train', text))
        size += len(text)
        if size >= chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch

@contextlib.contextmanager
def writing(out_dir):
    """An OSError while writing the output (a read-only disk, a file in the way, a full disk) in one line."""
    try:
        yield
    except OSError as e:
        raise PrepareError(f'cannot write {e.filename or out_dir}: {e.strerror or e}; '
                           'pass an --out_dir on a writable disk with free space') from None

def missing_dirs(path):
    """The folders os.makedirs(path) would create, deepest first: a failed run removes them again."""
    path, missing = os.path.abspath(path), []
    while not os.path.lexists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing

def prepare(input, tokenizer, tiers, out_dir, val_fraction=0.05, val_ids=None, doc_sep=BLANK_LINE,
            whole_file=False, workers=None, gpt2_ranks=None, overwrite=False):
    """Write out_dir/<name>_v<N>/{train,val}.bin and meta.json for every tier; skip tiers already complete, and
    refuse to replace a complete tier of other text or another split unless overwrite (runs trained on it read
    it by path)."""
    try:
        groups = re.compile(doc_sep).groups
    except re.error as e:
        raise PrepareError(f'--doc_sep {doc_sep!r} is not a valid regex ({e}); escape its special characters') from None
    if groups:  # re.split would return what they capture as documents
        raise PrepareError(f'--doc_sep {doc_sep!r} has a capturing group; make it (?:...)')
    toks = {n: load_tokenizer(tokenizer, n, gpt2_ranks) for n in sorted(set(tiers))}
    split = dict(val_ids=sorted(val_ids) if val_ids else None, val_fraction=None if val_ids else val_fraction,
                 doc_sep=None if whole_file else doc_sep)
    source = dict(source=os.path.abspath(input), source_bytes=input_bytes(input))
    dirs = {n: os.path.join(out_dir, f'{tok.name}_v{n}') for n, tok in toks.items()}
    differs = {n: tier_differs(dirs[n], toks[n], source, split) for n in toks}
    todo = [n for n in toks if differs[n] != []]
    for n in todo if not overwrite else []:
        if differs[n]:
            raise PrepareError(f'{dirs[n]} already holds a complete tier of other {" and ".join(differs[n])}; pass '
                               f'--overwrite to replace it (runs trained on it would then read other text), or '
                               f'another --out_dir')
    for n in sorted(set(toks) - set(todo)):
        print(f'{dirs[n]} is complete, skipping')
    if not todo:
        return
    files, created = {}, sorted({d for n in todo for d in missing_dirs(dirs[n])}, key=len, reverse=True)
    try:  # until the new bins are complete, a finished tier stays as it was
        with writing(out_dir):
            for n in todo:
                os.makedirs(dirs[n], exist_ok=True)
                for s in ('train', 'val'):  # write under a temporary name, renamed when complete
                    files[n, s] = open(os.path.join(dirs[n], f'{s}.bin.tmp'), 'wb')
        counts = {s: dict(documents=0, bytes=0) for s in ('train', 'val')}
        tokens = {(n, s): 0 for n in todo for s in ('train', 'val')}
        seconds = {n: 0.0 for n in todo}
        found_ids, t0 = set(), time.time()
        workers = workers or os.cpu_count()

        def write(future):
            out, secs = future.result()  # re-raises a worker's exception; a dead worker raises BrokenProcessPool
            for s, (n_docs, n_bytes, ids) in out.items():
                counts[s]['documents'] += n_docs
                counts[s]['bytes'] += n_bytes
                for n, arr in ids.items():
                    with writing(out_dir):
                        arr.tofile(files[n, s])
                    tokens[n, s] += len(arr)
            for n in secs:
                seconds[n] += secs[n]

        # the workers load the tokenizer as this process did
        with ProcessPoolExecutor(workers, initializer=init_worker,
                                 initargs=(tokenizer, todo, gpt2_ranks, os.getpid())) as pool:
            pending = deque()  # a few batches in flight keep every worker busy and memory bounded
            docs = read_documents(input, doc_sep, whole_file)
            for batch in batches(docs, val_fraction, set(val_ids or ()), found_ids):
                pending.append(pool.submit(encode_batch, batch))
                if len(pending) > 2 * workers:
                    write(pending.popleft())
            while pending:
                write(pending.popleft())
        with writing(out_dir):  # close flushes the last blocks
            for f in files.values():
                f.close()
        if counts['train']['documents'] + counts['val']['documents'] == 0:
            raise PrepareError(f'{input} has no documents; pass a non-empty input')
        if set(val_ids or ()) - found_ids:
            raise PrepareError(f'--val_ids {sorted(set(val_ids) - found_ids)} are not in {input}; fix the list')
        for s in ('train', 'val'):
            if counts[s]['documents'] == 0:
                raise PrepareError(f'the {s} split has no documents; give more documents or change --val_fraction')
        elapsed = time.time() - t0
        with writing(out_dir):
            for n in todo:
                if os.path.exists(os.path.join(dirs[n], 'meta.json')):
                    os.remove(os.path.join(dirs[n], 'meta.json'))  # the old bins stop counting as complete
                for s in ('train', 'val'):
                    os.replace(os.path.join(dirs[n], f'{s}.bin.tmp'), os.path.join(dirs[n], f'{s}.bin'))
                # tokens counts the BOS ids too: bits per byte takes the loss over all predicted positions
                meta = dict(tokenizer=tokenizer_record(tokenizer), tokenizer_sha256=toks[n].sha256, vocab_size=n,
                            bos_id=toks[n].bos_id, **source, split=split,
                            **{s: dict(tokens=tokens[n, s], **counts[s]) for s in ('train', 'val')})
                with open(os.path.join(dirs[n], 'meta.json.tmp'), 'w') as f:
                    json.dump(meta, f, indent=1)
                os.replace(os.path.join(dirs[n], 'meta.json.tmp'), os.path.join(dirs[n], 'meta.json'))
                total = tokens[n, 'train'] + tokens[n, 'val']
                print(f'{dirs[n]}: {total:,} tokens, {(counts["train"]["bytes"] + counts["val"]["bytes"]) / total:.3f} '
                      f'bytes/token, {total / seconds[n]:,.0f} tokens/s per worker')
    finally:  # a failed run leaves no temporary files or new empty folders; a completed one has renamed them
        for f in files.values():
            with contextlib.suppress(OSError):  # a full disk fails the flush again: the file goes anyway
                f.close()
        for path in [f.name for f in files.values()] + [os.path.join(dirs[n], 'meta.json.tmp') for n in todo]:
            if os.path.exists(path):
                os.remove(path)
        for d in created:
            with contextlib.suppress(OSError):  # not empty: a tier this run completed
                os.rmdir(d)
    print(f'{len(todo)} tiers in {elapsed:.1f}s wall with {workers} workers')

def eval_window_starts(n_tokens, n_windows, block_size):
    """Where train.py's val windows start: fixed and spread evenly over the split, the same for every run."""
    return np.linspace(0, n_tokens - block_size - 1, n_windows).astype(np.int64)

def complete_tier(tier_dir):
    """The meta.json of a complete tier (both bins of the sizes it records), or None."""
    try:
        with open(os.path.join(tier_dir, 'meta.json')) as f:
            meta = json.load(f)
        sizes_match = all(os.path.getsize(os.path.join(tier_dir, f'{s}.bin')) == 2 * meta[s]['tokens']
                          for s in ('train', 'val'))
        return meta if sizes_match and all(k in meta for k in ('tokenizer_sha256', 'source', 'split')) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None

def input_bytes(path):
    """The input's size (a folder's: its files'), which with its name tells the same text at another path."""
    return sum(os.path.getsize(f) for f in input_files(path)) if os.path.exists(path) else None

def tier_differs(tier_dir, tok, source, split):
    """None where there is no complete tier; else what differs from this run's request ([]: nothing, skip it).
    The same text moved (a clone elsewhere) is the same text: the same file name and size."""
    meta = complete_tier(tier_dir)
    if meta is None:
        return None
    moved = source['source_bytes'] is not None and meta.get('source_bytes') == source['source_bytes'] and \
        os.path.basename(meta['source']) == os.path.basename(source['source'])
    return [what for what, same in (
        (f'text ({meta["source"]})', meta['source'] == source['source'] or moved),
        (f'split ({", ".join(f"{k} {v}" for k, v in meta["split"].items() if v is not None)})', meta['split'] == split),
        ('tokenizer', (meta['tokenizer_sha256'], meta['vocab_size']) == (tok.sha256, tok.vocab_size))) if not same]

META_KEYS = ('tokenizer', 'tokenizer_sha256', 'vocab_size', 'bos_id', 'source', 'train', 'val')  # what readers use
SPLIT_KEYS = ('documents', 'tokens', 'bytes')

def read_meta(tier_dir):
    """A tier's meta.json, with the keys its readers use; else PrepareError, one line that says what to do."""
    path = os.path.join(tier_dir, 'meta.json')
    if not os.path.isfile(path):
        raise PrepareError(f'no prepared data in {tier_dir} (no meta.json): run prepare.py for that tier, or pass '
                           'a tier folder that it wrote, such as data/tinyshakespeare/llama2_v512')
    try:
        with open(path, encoding='utf-8') as f:
            meta = json.load(f)
    except ValueError as e:  # not JSON, or not UTF-8
        raise PrepareError(f'{path} is broken ({e}): delete {tier_dir} and re-run prepare.py') from None
    missing = [k for k in META_KEYS if not isinstance(meta, dict) or k not in meta] or \
        [f'{s}.{k}' for s in ('train', 'val') for k in SPLIT_KEYS if not isinstance(meta[s], dict) or k not in meta[s]]
    if missing:
        raise PrepareError(f'{path} is broken (no "{missing[0]}"): delete {tier_dir} and re-run prepare.py')
    return meta

def open_tier(tier_dir):
    """Check a tier's bins against its meta.json, as a run does before it trusts them; return (meta,
    {'train': bin, 'val': bin}) as uint16 memmaps. One pass over each bin for its largest id: about 0.1 s
    per 50M tokens once the file is in the page cache, which the training run needs anyway."""
    meta, bins = read_meta(tier_dir), {}
    for s in ('train', 'val'):
        path, tokens = os.path.join(tier_dir, f'{s}.bin'), meta[s]['tokens']
        if not os.path.isfile(path):
            raise PrepareError(f'{path} is missing: delete {tier_dir} and re-run prepare.py')
        size = os.path.getsize(path)
        if size != 2 * tokens or size == 0:  # checked before the memmap, which refuses an odd or empty file
            raise PrepareError(f'{path} has {size:,} bytes but meta.json says {tokens:,} tokens of 2 bytes; '
                               f'delete {tier_dir} and re-run prepare.py')
        bins[s] = np.memmap(path, dtype=np.uint16, mode='r')
        if (top := int(bins[s].max())) >= meta['vocab_size']:
            raise PrepareError(f'{path} has id {top}, beyond tier {meta["vocab_size"]} of meta.json; '
                               f'delete {tier_dir} and re-run prepare.py')
    return meta, bins

def inspect(tier_dir, tokenizer=None, gpt2_ranks=None):
    """Print a tier's counts and bytes per token, check its ids, and decode the start of a document."""
    meta, bins = open_tier(tier_dir)
    tok = load_tokenizer(tokenizer or meta['tokenizer'], meta['vocab_size'], gpt2_ranks, meta['tokenizer_sha256'])
    print(f'{tier_dir}: {meta["tokenizer"]} tier {meta["vocab_size"]}, source {meta["source"]}')
    for s, data in bins.items():
        m = meta[s]
        print(f'{s}: {m["documents"]:,} documents, {m["tokens"]:,} tokens, {m["bytes"]:,} bytes, '
              f'{m["bytes"] / m["tokens"]:.3f} bytes/token, max id {data.max()}')
    ids = bins['val'][1:201].tolist()  # the start of the first val document, up to the next BOS
    ids = ids[:ids.index(tok.bos_id)] if tok.bos_id in ids else ids
    print(f'--- {len(ids)} tokens of the first val document:\n{tok.decode(ids)}')

if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--input', help='a .txt/.jsonl/.jsonl.xz/.json.gz file or a folder of them')
    parser.add_argument('--dataset', choices=DATASETS, help='a built-in source (tinyshakespeare when no --input)')
    parser.add_argument('--tokenizer', default='llama2', help='llama2 (in assets/), PATH/tokenizer.model, or gpt2')
    parser.add_argument('--gpt2_ranks', help='a local .tiktoken rank file for --tokenizer gpt2')
    parser.add_argument('--tiers', type=int, nargs='+', default=[4096, 8192, 16384, 32000])
    parser.add_argument('--out_dir', help='default data/<dataset>')
    parser.add_argument('--val_fraction', type=float, default=0.05, help='every 1/f-th document goes to val')
    parser.add_argument('--val_ids', help='comma list of pg_id values held out for val (jsonl input)')
    parser.add_argument('--doc_sep', help='regex between documents in .txt files (default: a blank line)')
    parser.add_argument('--whole_file', action='store_true', help='each .txt file is one document')
    parser.add_argument('--workers', type=int, default=os.cpu_count())
    parser.add_argument('--overwrite', action='store_true', help='replace complete tiers of other text or split')
    parser.add_argument('--inspect', metavar='TIER_DIR', help='print a prepared tier and decode a sample')
    args = parser.parse_args()
    try:
        if args.inspect:
            inspect(args.inspect, None if args.tokenizer == 'llama2' else args.tokenizer, args.gpt2_ranks)
            sys.exit()
        if args.workers is not None and args.workers < 1:  # before any download: a refusal writes nothing
            raise PrepareError(f'--workers {args.workers}: pass 1 or more')
        if not 0 < args.val_fraction < 1:  # (also refuses nan)
            raise PrepareError(f'--val_fraction {args.val_fraction}: pass a fraction between 0 and 1, such as 0.05')
        try:
            val_ids = [int(x) for x in args.val_ids.split(',')] if args.val_ids else None
        except ValueError:
            raise PrepareError(f'--val_ids {args.val_ids!r}: pass pg_id numbers joined by commas, such as 1342,84') from None
        name = args.dataset or ('tinyshakespeare' if not args.input else re.sub(r'\..*', '', os.path.basename(
            os.path.normpath(args.input))))
        ds = DATASETS.get(name, {})
        if not args.input and not (ds.get('url') or ds.get('path')):
            raise PrepareError(f'{name} has no download; pass --input PATH')
        url = ds.get('url')
        input = args.input or ds.get('path') or download(url, os.path.join(CACHE, name, os.path.basename(url)), ds['sha256'])
        prepare(input, args.tokenizer, args.tiers, args.out_dir or os.path.join('data', name), args.val_fraction,
                val_ids or ds.get('val_ids'), args.doc_sep or ds.get('doc_sep', BLANK_LINE), args.whole_file,
                args.workers, args.gpt2_ranks, args.overwrite)
    except PrepareError as e:
        sys.exit(f'prepare.py: {e}')
