"""
tokenizer.py -- the Llama-family tokenizers, read from a checkpoint folder as `transformers.AutoTokenizer`
reads them, without transformers or the `tokenizers` library.

Two families, both BPE (Sennrich et al., 2016) stored in a Hugging Face `tokenizer.json`:
  byte-level  (GPT-2 byte map; Llama 3, Qwen2, SmolLM2): pre-tokenizers Split(regex), Digits, ByteLevel
              and Sequences of them; the vocabulary may lack some of the 256 single bytes (those bytes
              are then dropped, as the `tokenizers` BPE model drops characters it has no token for).
              BPE itself runs in tiktoken (token ids are the merge ranks in these vocabularies).
  SentencePiece-style (Llama 2, Mistral v0.1-v0.3, TinyLlama): '▁' for spaces (a Metaspace
              pre-tokenizer, or Prepend + Replace normalizers), `byte_fallback` to <0xNN> tokens for
              characters outside the vocabulary, `fuse_unk`. tiktoken cannot express merging by merge
              rank over characters, so this BPE is plain Python (bench/tokenizer.py measures it).
Meta's original Llama 3 `tokenizer.model` (base64 tiktoken ranks) is read too; a SentencePiece
`tokenizer.model` protobuf is refused with a pointer to the checkpoint's tokenizer.json.

Which special tokens frame a text follows transformers 5: the tokenizer.json post-processor
(TemplateProcessing: "<s> $A" in Llama 2, "<|begin_of_text|> $A" in Llama 3), else nothing (SmolLM2 and
Qwen2 add no BOS); tokenizer_config.json's add_bos_token / add_eos_token are ignored, as transformers 5
ignores them when a tokenizer.json is present. The classes LlamaTokenizer and GPT2Tokenizer are rebuilt by
transformers from the vocabulary with their own pre-tokenizer and decoder; this file does the same.
"""
import base64
import hashlib
import json
import unicodedata
from pathlib import Path

import regex  # tiktoken's own dependency; `re` lacks \p{L}
import tiktoken


class LoadError(ValueError):
    """A checkpoint, config or tokenizer nanoMASA cannot use. The message is one line: problem and fix."""


def read_json(file, default=None, fix="re-download it", kind=dict):
    """Parsed JSON file, which must be a `kind` (a JSON object unless told otherwise); `default` when the file
    is absent and a default is given. Bad JSON or another shape raises one line naming the file and `fix`."""
    file = Path(file)
    if default is not None and not file.is_file():
        return default
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:  # also UnicodeDecodeError
        raise LoadError(f"{file}: not valid JSON ({' '.join(str(e).split())}): {fix}") from None
    if kind is not None and not isinstance(d, kind):
        raise LoadError(f"{file}: a JSON {type(d).__name__} where a JSON {'object' if kind is dict else kind.__name__} "
                        f"is expected: {fix}")
    return d


# Meta's Llama 3 reference tokenizer: split pattern and the 256 special tokens that follow the base ranks.
LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>",
                   ] + [f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)]
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"  # ByteLevel use_regex
END_TOKENS = ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|im_end|>")  # stop generation
# transformers' PreTrainedTokenizerBase.clean_up_tokenization, applied by decode() when the config asks
CLEAN_UP = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


def bytes_to_unicode():
    """GPT-2's map from the 256 byte values to printable characters, used by byte-level BPE vocabularies."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in bs]  # unprintable bytes go to chr(256), chr(257), ... in order
    return {**{b: chr(b) for b in bs}, **{b: chr(256 + n) for n, b in enumerate(rest)}}


BYTE_MAP = bytes_to_unicode()                  # byte value -> its character in a byte-level vocabulary
BYTE_OF = {c: b for b, c in BYTE_MAP.items()}  # and back
WORD_START = regex.compile("(?<=[^▁])(?=▁)")   # before every '▁' that follows another character

# -----------------------------------------------------------------------------
# the pieces of a tokenizer.json pipeline, each a small function (names are the `tokenizers` type names)


def _normalizers(spec, file):
    """tokenizer.json "normalizer" -> list of str -> str functions, applied to each text between added tokens."""
    if spec is None:
        return []
    t = spec.get("type")
    if t == "Sequence":
        return [f for s in spec["normalizers"] for f in _normalizers(s, file)]
    if t in ("NFC", "NFD", "NFKC", "NFKD"):
        return [lambda s, form=t: unicodedata.normalize(form, s)]
    if t == "Prepend":  # tokenizers prepends to non-empty text only
        return [lambda s, p=spec["prepend"]: p + s if s else s]
    if t == "Replace" and "String" in spec["pattern"]:
        return [lambda s, a=spec["pattern"]["String"], b=spec["content"]: s.replace(a, b)]
    raise LoadError(f"{file}: unsupported normalizer {json.dumps(spec)[:80]}: nanoMASA reads NFC/NFKC, Prepend "
                    f"and Replace(string); convert the tokenizer with transformers or pick a Llama-family checkpoint")


def _split_isolated(rx, s):
    """tokenizers' Split(behavior=Isolated): every match and every gap between matches is its own piece."""
    out, at = [], 0
    for m in rx.finditer(s):
        if m.start() > at:
            out.append(s[at:m.start()])
        if m.end() > m.start():
            out.append(m.group())
        at = m.end()
    return out + ([s[at:]] if at < len(s) else [])


def _pre_tokenizer(spec, file):
    """tokenizer.json "pre_tokenizer" -> list of steps (kind, arg): ("split", regex), ("prefix", " "),
    ("metaspace", (replacement, prepend_scheme, split)), ("bytes", None) for ByteLevel's byte map."""
    if spec is None:
        return []
    t = spec.get("type")
    if t == "Sequence":
        return [st for s in spec["pretokenizers"] for st in _pre_tokenizer(s, file)]
    if t == "Split" and not spec.get("invert") and spec.get("behavior", "Isolated") == "Isolated":
        p = spec["pattern"]
        return [("split", p["Regex"] if "Regex" in p else regex.escape(p["String"]))]
    if t == "Digits":  # Rust's char::is_numeric is Unicode N (Nd, Nl, No)
        return [("split", r"\p{N}" if spec.get("individual_digits") else r"\p{N}+")]
    if t == "ByteLevel":
        return ([("prefix", " ")] if spec.get("add_prefix_space") else []) + \
            ([("split", GPT2_PATTERN)] if spec.get("use_regex", True) else []) + [("bytes", None)]
    if t == "Metaspace":
        scheme = spec.get("prepend_scheme", "always" if spec.get("add_prefix_space", True) else "never")
        return [("metaspace", (spec.get("replacement", "▁"), scheme, spec.get("split", True)))]
    raise LoadError(f"{file}: unsupported pre_tokenizer {json.dumps(spec)[:80]}: nanoMASA reads Split(regex, "
                    f"Isolated), Digits, ByteLevel, Metaspace and Sequences of them")


def _decoders(spec, file):
    """tokenizer.json "decoder" -> list of steps on the token strings (tokenizers' decode_chain)."""
    if spec is None:
        return []
    t = spec.get("type")
    if t == "Sequence":
        return [st for s in spec["decoders"] for st in _decoders(s, file)]
    if t == "Replace" and "String" in spec["pattern"]:
        return [("replace", (spec["pattern"]["String"], spec["content"]))]
    if t == "Strip":
        return [("strip", (spec["content"], spec["start"], spec["stop"]))]
    if t == "Metaspace":
        scheme = spec.get("prepend_scheme", "always" if spec.get("add_prefix_space", True) else "never")
        return [("metaspace", (spec.get("replacement", "▁"), scheme))]
    if t in ("ByteLevel", "ByteFallback", "Fuse"):
        return [(t.lower(), None)]
    raise LoadError(f"{file}: unsupported decoder {json.dumps(spec)[:80]}: nanoMASA reads ByteLevel, "
                    f"ByteFallback, Fuse, Replace, Strip and Metaspace")


def _template(spec, file, ids):
    """tokenizer.json "post_processor" -> (prefix ids, suffix ids) framing a single text, or None if absent."""
    if spec is None:
        return None
    t = spec.get("type")
    if t == "ByteLevel":  # only trims offsets
        return [], []
    if t == "Sequence":
        parts = [_template(s, file, ids) for s in spec["processors"]]
        return [i for p in parts for i in p[0]], [i for p in parts for i in p[1]]
    if t == "TemplateProcessing":
        pre, post, seen = [], [], False
        for item in spec["single"]:
            if "Sequence" in item:
                seen = True
            else:
                name = item["SpecialToken"]["id"]
                toks = spec["special_tokens"].get(name, {}).get("ids") or [ids[name]]
                (post if seen else pre).extend(toks)
        return pre, post
    raise LoadError(f"{file}: unsupported post_processor {t!r}: nanoMASA reads TemplateProcessing and ByteLevel")

# -----------------------------------------------------------------------------
# BPE by merge rank over symbols (SentencePiece-style vocabularies), as tokenizers' BPE::merge_word


def bpe_merge(symbols, ranks):
    """Merge the adjacent pair of lowest merge rank (leftmost on ties) until no listed pair is left.
    symbols: list of token strings; ranks: {(left, right): rank}. The `tokenizers` priority queue gives
    the same result; words are short (split at '▁'), so the quadratic scan is cheap."""
    while len(symbols) > 1:
        best, at = None, -1
        for i in range(len(symbols) - 1):
            r = ranks.get((symbols[i], symbols[i + 1]))
            if r is not None and (best is None or r < best):
                best, at = r, i
        if best is None:
            break
        symbols[at:at + 2] = [symbols[at] + symbols[at + 1]]
    return symbols

# -----------------------------------------------------------------------------
# the tokenizer


class Tokenizer:
    """Text <-> ids as transformers.AutoTokenizer gives them for the same checkpoint folder.

    vocab: {token string: id}; merges: [(left, right)] in rank order; added: tokenizer.json added_tokens
    ([{"content", "id", "special", "lstrip", "rstrip", ...}]); normalizers / pre / decoders: steps from the
    functions above; byte_level: the vocabulary is in GPT-2's byte map (else SentencePiece-style symbols);
    prefix / suffix: ids framing a text (BOS / EOS as the post-processor adds them)."""

    def __init__(self, vocab, merges, added, pre, decoders=(), normalizers=(), byte_level=True, unk=None,
                 byte_fallback=False, fuse_unk=False, ignore_merges=False, bos=None, eos=None, pad=None,
                 stop=(), prefix=None, suffix=(), clean_up=False):
        self.vocab, self.normalizers, self.decoders = vocab, list(normalizers), list(decoders)
        self.byte_level, self.unk, self.byte_fallback, self.fuse_unk = byte_level, unk, byte_fallback, fuse_unk
        self.ignore_merges, self.clean_up = ignore_merges, clean_up
        self.added = {t["content"]: t["id"] for t in added}
        self.specials = {t["content"]: t["id"] for t in added if t.get("special", True)}
        self.strip = {t["content"]: (t.get("lstrip", False), t.get("rstrip", False)) for t in added}
        self.id_to_token = {i: s for s, i in vocab.items()} | {i: s for s, i in self.added.items()}
        self.n_vocab = max(self.id_to_token) + 1
        name = lambda t: self.added.get(t, vocab.get(t)) if t is not None else None
        self.bos_id, self.eos_id = name(bos), name(eos)
        self.pad_id = name(pad) if name(pad) is not None else self.eos_id if self.eos_id is not None else 0
        self.stop_ids = {self.added[t] for t in END_TOKENS if t in self.added} | set(stop) | ({self.eos_id} - {None})
        self.prefix = [self.bos_id] if prefix is None and self.bos_id is not None else list(prefix or [])
        self.suffix = list(suffix)
        # added tokens, longest first, so the regex alternation finds the leftmost-longest one (as tokenizers' trie)
        alts = sorted(self.added, key=len, reverse=True)
        self.added_rx = regex.compile("|".join(map(regex.escape, alts))) if alts else None
        self.ranks = {tuple(m): r for r, m in enumerate(merges)}
        self._cache = {}
        self._build_pre(pre)
        # SentencePiece vocabularies put '▁' only at the start of a token: then a word may end before every
        # '▁' that follows another character, and BPE runs on short words (checked, else whole pieces)
        self.split_words = not byte_level and "▁" in vocab and not any(regex.search("[^▁]▁", t) for t in vocab)
        # the fingerprint covers what decides the ids (prepared data records it); for the tiktoken path the
        # byte ranks decide the merges, so two files of one vocabulary (json, Meta's rank file) agree
        tk = self.enc is not None and self.tiktoken_ok
        h = hashlib.sha256(json.dumps([pre, [f.__defaults__ for f in self.normalizers], self.decoders, byte_level,
                                       unk, byte_fallback, fuse_unk, tk or ignore_merges, self.prefix,
                                       self.suffix]).encode())
        h.update(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1])).encode())
        h.update(json.dumps([] if tk else merges).encode() + json.dumps(sorted(self.added.items())).encode())
        self.fingerprint = h.hexdigest()[:16]

    def _build_pre(self, pre):
        """Split the pre-tokenizer steps: the last regex split of a byte-level tokenizer runs inside tiktoken
        (with BPE); the steps before it run here in Python."""
        self.pre = [(k, regex.compile(a) if k == "split" else a) for k, a in pre]
        self.enc = None
        if not self.byte_level:
            return
        if any(c not in BYTE_OF for s in self.vocab for c in s):
            raise LoadError("tokenizer vocabulary has characters outside GPT-2's byte map, yet its pre-tokenizer "
                            "is ByteLevel: a broken tokenizer.json; re-download it")
        ranks = {bytes(BYTE_OF[c] for c in s): i for s, i in self.vocab.items()}
        # tiktoken merges the pair whose concatenation has the lowest id; tokenizers the listed pair of lowest
        # merge rank. They agree when ids follow merge order (true of Llama 3, Qwen2, SmolLM2; checked here).
        ids = [self.vocab.get(a + b, -1) for a, b in self.ranks]
        self.tiktoken_ok = all(x < y for x, y in zip(ids, ids[1:])) and ids[:1] != [-1]
        self.missing = bytes(b for b in range(256) if bytes([b]) not in ranks)  # dropped, as tokenizers drops them
        splits = [i for i, (k, _) in enumerate(pre) if k == "split"]
        last = splits[-1] if splits else None
        tail_ok = last is not None and all(k == "bytes" for k, _ in pre[last + 1:])
        pattern = pre[last][1] if tail_ok else r"[\s\S]+"  # else every step runs here and tiktoken sees whole pieces
        self.py_pre = self.pre[:last] if tail_ok else [st for st in self.pre if st[0] != "bytes"]
        self.tk_rx = regex.compile(pattern)
        self.enc = tiktoken.Encoding("nanomasa", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})

    # --- encoding

    def encode(self, text, bos=False, eos=False):
        """Text -> ids; added-token text such as <|eot_id|> becomes its id. bos=True frames the text as the
        checkpoint's own tokenizer does (transformers' add_special_tokens=True: BOS for Llama, nothing for
        Qwen2 / SmolLM2); eos=True appends the EOS id (the end of a training example), if there is one."""
        ids = []
        for seg, first in self._segments(text):
            if isinstance(seg, int):
                ids.append(seg)
            else:
                ids += self._encode_text(seg, first)
        if bos:
            ids = self.prefix + ids + self.suffix
        return ids + ([self.eos_id] if eos and self.eos_id is not None else [])

    def _segments(self, text):
        """(text piece, starts the text) and (added-token id, False) in order; lstrip/rstrip added tokens
        swallow the whitespace beside them, as tokenizers' AddedVocabulary does."""
        if self.added_rx is None:
            yield text, True
            return
        at = 0
        for m in self.added_rx.finditer(text):
            s, e = m.start(), m.end()
            lstrip, rstrip = self.strip[m.group()]
            if lstrip:
                while s > at and text[s - 1].isspace():
                    s -= 1
            if s > at:
                yield text[at:s], at == 0
            yield self.added[m.group()], False
            if rstrip:
                while e < len(text) and text[e].isspace():
                    e += 1
            at = e
        if at < len(text):
            yield text[at:], at == 0

    def _encode_text(self, s, first):
        for f in self.normalizers:
            s = f(s)
        if self.enc is not None:
            return self._encode_bytes(s)
        ids = []
        for p in self._pre_tokenize([s], self.pre, first):
            for w in (WORD_START.split(p) if self.split_words else [p]):
                ids += self._bpe_word(w)
        return ids

    def _pre_tokenize(self, pieces, steps, first):
        for kind, arg in steps:
            if kind == "split":
                pieces = [p for q in pieces for p in _split_isolated(arg, q)]
            elif kind == "prefix":  # ByteLevel(add_prefix_space): a space before every piece not starting with one
                pieces = [p if p.startswith(" ") else " " + p for p in pieces]
            elif kind == "metaspace":  # tokenizers' Metaspace: spaces -> '▁', prepend '▁', maybe split before '▁'
                rep, scheme, split = arg
                out = []
                for i, p in enumerate(pieces):
                    p = p.replace(" ", rep)
                    if (scheme == "always" or (scheme == "first" and first and i == 0)) and not p.startswith(rep):
                        p = rep + p
                    out += regex.split(f"(?={regex.escape(rep)})", p) if split else [p]
                pieces = [p for p in out if p]
        return pieces

    def _encode_bytes(self, s):
        """Byte-level BPE: Python pre-tokenizer steps, then tiktoken (last regex split + BPE) on each piece."""
        pieces = self._pre_tokenize([s], self.py_pre, True) if self.py_pre else [s]
        ids = []
        for p in pieces:
            raw = p.encode()
            if self.tiktoken_ok and len(raw.translate(None, self.missing)) == len(raw):  # no byte it lacks
                ids += self.enc.encode_ordinary(p)
                continue
            for m in self.tk_rx.finditer(p):  # the slow path: drop the bytes the vocabulary lacks, merge by rank
                b = m.group().encode().translate(None, self.missing)
                if b:
                    ids += self._bpe_word("".join(BYTE_MAP[x] for x in b))
        return ids

    def _bpe_word(self, w):
        """One pre-token -> ids by merge rank; unknown characters go to <0xNN> bytes (byte_fallback), else
        to unk (consecutive ones fused if fuse_unk), else are dropped -- tokenizers' BPE::merge_word."""
        hit = self._cache.get(w)
        if hit is not None:
            return hit
        if self.ignore_merges and w in self.vocab:
            return [self.vocab[w]]
        syms, unk_run = [], False
        for ch in w:
            if ch in self.vocab:
                syms.append(ch)
                unk_run = False
            elif self.byte_fallback and all(f"<0x{b:02X}>" in self.vocab for b in ch.encode()):
                syms += [f"<0x{b:02X}>" for b in ch.encode()]
                unk_run = False
            elif self.unk is not None:
                if not (self.fuse_unk and unk_run):
                    syms.append(self.unk)
                unk_run = True
        ids = [self.vocab.get(t, self.added.get(t)) for t in bpe_merge(syms, self.ranks)]
        if len(self._cache) > 200_000:
            self._cache.clear()
        self._cache[w] = ids
        return ids

    # --- decoding

    def decode(self, ids):
        """Ids -> text through the tokenizer.json decoder, as transformers' decode(skip_special_tokens=False)."""
        try:
            toks = [self.id_to_token[int(i)] for i in ids]
        except KeyError as e:
            raise ValueError(f"decode: token id {e.args[0]} is outside the tokenizer's {self.n_vocab} ids") from None
        for kind, arg in self.decoders:
            if kind == "bytelevel":  # back through GPT-2's byte map; tokens with other characters stay UTF-8
                bs = b"".join(bytes(BYTE_OF[c] for c in t) if all(c in BYTE_OF for c in t) else t.encode()
                              for t in toks)
                toks = [bs.decode("utf-8", errors="replace")]
            elif kind == "replace":
                toks = [t.replace(*arg) for t in toks]
            elif kind == "bytefallback":
                toks = _byte_fallback(toks)
            elif kind == "fuse":
                toks = ["".join(toks)]
            elif kind == "strip":
                content, start, stop = arg
                toks = [_strip(t, content, start, stop) for t in toks]
            elif kind == "metaspace":
                rep, scheme = arg
                toks = [t.replace(rep, " ") for t in toks]
                if toks and scheme != "never" and toks[0].startswith(" "):
                    toks[0] = toks[0][1:]
        text = "".join(toks)
        if self.clean_up:
            for a, b in CLEAN_UP:
                text = text.replace(a, b)
        return text

    # --- loading

    @classmethod
    def from_pretrained(cls, path):
        """A folder with tokenizer.json (preferred) or Meta's tokenizer.model, or either file;
        tokenizer_config.json names bos/eos/pad and generation_config.json adds stop ids, when present.
        Files that are valid JSON of an unexpected structure (a field of the wrong type, a list where an
        object belongs) are refused in one line too, not with a traceback."""
        try:
            return cls._from_folder(Path(path))
        except (TypeError, AttributeError, KeyError, IndexError) as e:
            raise LoadError(f"{path}: the tokenizer files have an unexpected structure ({type(e).__name__}: {e}): "
                            f"re-download tokenizer.json / tokenizer_config.json") from None

    @classmethod
    def _from_folder(cls, path):
        if not path.exists():
            raise LoadError(f"{path} does not exist: pass the checkpoint folder holding tokenizer.json or tokenizer.model")
        d = path if path.is_dir() else path.parent
        file = path if path.is_file() else next((d / n for n in ("tokenizer.json", "tokenizer.model")
                                                if (d / n).is_file()), None)
        if file is None:
            raise LoadError(f"no tokenizer.json or tokenizer.model in {d}: copy the checkpoint's tokenizer files there")
        tc, eos = read_json(d / "tokenizer_config.json", {}), read_json(d / "generation_config.json", {}).get("eos_token_id")
        name = lambda v: v.get("content") if isinstance(v, dict) else v
        kw = dict(bos=name(tc.get("bos_token")), eos=name(tc.get("eos_token")), pad=name(tc.get("pad_token")),
                  stop=[] if eos is None else [eos] if isinstance(eos, int) else eos,
                  clean_up=bool(tc.get("clean_up_tokenization_spaces", False)))
        if file.suffix == ".json":
            return cls._from_tokenizer_json(file, tc, kw)
        if "bos_token" not in tc:  # Meta's original folder has no tokenizer_config.json: use the reference's
            kw.update(bos="<|begin_of_text|>", eos="<|end_of_text|>")
        return cls._from_tiktoken_model(file, kw)

    @classmethod
    def _from_tiktoken_model(cls, file, kw):
        """Llama 3 tokenizer.model: lines 'base64(token bytes) rank'; the 256 specials follow the ranks.
        Meta's reference tokenizer frames a dialog with <|begin_of_text|> and nothing after."""
        ranks = {}
        try:
            for line in file.read_bytes().splitlines():
                if line.strip():
                    tok, rank = line.split()
                    ranks[base64.b64decode(tok, validate=True)] = int(rank)
        except ValueError:  # also binascii.Error
            ranks = {}
        if not ranks:
            raise LoadError(f"{file} is not a tiktoken rank file (a SentencePiece model, as Llama 2 and Mistral "
                            f"ship?): use the checkpoint's tokenizer.json instead, which nanoMASA reads")
        vocab = {"".join(BYTE_MAP[b] for b in t): r for t, r in ranks.items()}
        by_rank = sorted(vocab.items(), key=lambda kv: kv[1])
        # tiktoken ranks are merge ranks: every multi-byte token is some pair of shorter ones; the merge list
        # only has to be in rank order for the tiktoken fast path, so each token's own (any) split will do
        merges = []
        for s, _ in by_rank:
            if len(s) > 1:
                merges.append(next((s[:k], s[k:]) for k in range(1, len(s)) if s[:k] in vocab and s[k:] in vocab))
        added = [{"content": s, "id": len(ranks) + i, "special": True} for i, s in enumerate(LLAMA3_SPECIALS)]
        pre = [("split", LLAMA3_PATTERN), ("bytes", None)]
        return cls(vocab, merges, added, pre, [("bytelevel", None)], **kw)

    @classmethod
    def _from_tokenizer_json(cls, file, tc, kw):
        """HF tokenizer.json with a BPE model, read as transformers 5 reads it for tokenizer_config's class."""
        tj = read_json(file)
        model = tj.get("model") or {}
        if model.get("type") != "BPE":
            raise LoadError(f"{file}: unsupported model {model.get('type')!r}: nanoMASA reads BPE tokenizers "
                            f"(Llama, Mistral, Qwen2, SmolLM2)")
        for key, ok in (("dropout", (None, 0, 0.0)), ("continuing_subword_prefix", (None, "")),
                        ("end_of_word_suffix", (None, ""))):
            if model.get(key) not in ok:
                raise LoadError(f"{file}: unsupported BPE setting {key}={model.get(key)!r}")
        if any(t.get("single_word") for t in tj.get("added_tokens", [])):
            raise LoadError(f"{file}: unsupported added token setting single_word=true")
        cls_name = (tc.get("tokenizer_class") or "").removesuffix("Fast")
        norm, pre, dec = tj.get("normalizer"), tj.get("pre_tokenizer"), tj.get("decoder")
        # transformers 5 rebuilds these two classes from vocab + merges with their own pipeline
        # (models/llama/tokenization_llama.py, models/gpt2/tokenization_gpt2.py), ignoring the file's
        if cls_name == "LlamaTokenizer":
            prefix_space = tc.get("add_prefix_space")
            prefix_space = True if prefix_space is None else prefix_space
            scheme = ("first" if not tc.get("legacy", False) else "always") if prefix_space else "never"
            norm, pre = None, {"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": False}
            dec = {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}] + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if prefix_space else [])}
            model = {**model, "fuse_unk": True, "byte_fallback": True}
        elif cls_name == "GPT2Tokenizer":
            norm, pre = None, {"type": "ByteLevel", "add_prefix_space": bool(tc.get("add_prefix_space", False))}
            dec = {"type": "ByteLevel"}
        normalizers, steps, decoders = _normalizers(norm, file), _pre_tokenizer(pre, file), _decoders(dec, file)
        byte_level = any(k == "bytes" for k, _ in steps)
        if byte_level and any(k == "metaspace" for k, _ in steps):
            raise LoadError(f"{file}: unsupported pre_tokenizer: both ByteLevel and Metaspace")
        added = tj.get("added_tokens", [])
        ids = {**model["vocab"], **{t["content"]: t["id"] for t in added}}
        # which tokens frame a text: the post-processor alone. transformers 5 drops tokenizer_config.json's
        # add_bos_token / add_eos_token when a tokenizer.json is present (tokenization_utils_base.py,
        # _from_pretrained), and a null post-processor adds nothing (TokenizersBackend.update_post_processor)
        prefix, suffix = _template(tj.get("post_processor"), file, ids) or ([], [])
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        return cls(model["vocab"], merges, added, steps, decoders, normalizers, byte_level,
                   unk=model.get("unk_token"), byte_fallback=bool(model.get("byte_fallback")),
                   fuse_unk=bool(model.get("fuse_unk")), ignore_merges=bool(model.get("ignore_merges")),
                   prefix=prefix, suffix=suffix, **kw)


def _byte_fallback(toks):
    """tokenizers' ByteFallback decoder: runs of <0xNN> tokens become their UTF-8 text, or one U+FFFD per
    byte when the run is not valid UTF-8."""
    out, run = [], []
    for t in toks + [None]:
        if t is not None and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            try:
                run.append(int(t[3:5], 16))
                continue
            except ValueError:
                pass
        if run:
            try:
                out.append(bytes(run).decode("utf-8"))
            except UnicodeDecodeError:
                out += ["\ufffd"] * len(run)
            run = []
        if t is not None:
            out.append(t)
    return out


def _strip(t, content, start, stop):
    """tokenizers' Strip decoder: remove up to `start` leading and `stop` trailing `content` characters."""
    i = 0
    while i < start and i < len(t) and t[i] == content:
        i += 1
    j = len(t)
    while len(t) - j < stop and j > i and t[j - 1] == content:
        j -= 1
    return t[i:j]
