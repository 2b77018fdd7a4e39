"""Tokenizer wrapper around the Hugging Face ``tokenizers`` library.

``CoETokenizer`` exposes what Megatron-Core's data pipeline reads from a tokenizer
(``megatron/core/datasets``, 0.16.1):

* ``vocab_size`` (``gpt_dataset.py:91``, token dtype of the indexed data),
* ``eod`` (``gpt_dataset.py:255``, masks / position-id resets at document ends),
* ``pad`` (``megatron_dataset.py:75``; ids equal to it are masked out of the loss; when a
  tokenizer has no pad token this property raises and Megatron falls back to ``-1``),
* ``eos`` (``megatron_dataset.py:89``, pad-collision check; we alias it to ``eod``),
* ``unique_identifiers`` (part of the dataset cache hash, ``megatron_dataset.py:66``: we use the
  content fingerprint, not the path, so moving a tokenizer file keeps caches valid and changing
  its content invalidates them),

plus ``tokenize``/``detokenize``/``vocab``/``inv_vocab``/``path`` of Megatron's tokenizer
interface (``megatron.core.tokenizers.MegatronTokenizerBase``). It follows that interface by duck
typing rather than subclassing: Megatron-Core never checks the tokenizer's type, and importing
``megatron.core`` costs seconds, which this module (used by the preprocessing CLI and eval
scripts) does not need to pay.

Tokenizers trained here are byte-level BPE (GPT-2 style pre-tokenization, no normalizer, so
``detokenize(tokenize(text)) == text`` for any text) with two special tokens:
``<|endoftext|>`` (id 0, end of document) and ``<|pad|>`` (id 1).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from typing import Iterable, Iterator, List, Optional, Sequence, Union

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOD_TOKEN, PAD_TOKEN)
# End-of-document candidates tried, in order, when loading a tokenizer not trained here.
EOD_CANDIDATES = (EOD_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")
PAD_CANDIDATES = (PAD_TOKEN, "<pad>", "[PAD]")
TOKENIZER_FILE = "tokenizer.json"
# the files of a tokenizer directory for transformers.AutoTokenizer (save_for_transformers)
TRANSFORMERS_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# 256 byte symbols + the special tokens: the smallest vocabulary a byte-level BPE can have.
MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS)


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used (missing, unreadable, no end-of-document token)."""


class CoETokenizer:
    """A ``tokenizers.Tokenizer`` with Megatron's tokenizer interface.

    Args:
        tokenizer: the Hugging Face tokenizer.
        path: where it was loaded from / saved to (bookkeeping only; not part of its identity).
        eod_token: the end-of-document token; found among ``EOD_CANDIDATES`` when None.
        pad_token: the padding token; found among ``PAD_CANDIDATES`` when None (may be absent).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        path: Optional[str] = None,
        eod_token: Optional[str] = None,
        pad_token: Optional[str] = None,
    ) -> None:
        self.path = path
        self._tok = tokenizer
        where = path or "the tokenizer"
        if eod_token is None:
            eod_token = next((t for t in EOD_CANDIDATES if tokenizer.token_to_id(t) is not None), None)
            if eod_token is None:
                raise TokenizerError(
                    f"{where} has none of the end-of-document tokens {list(EOD_CANDIDATES)}; "
                    "pass eod_token= explicitly"
                )
        elif tokenizer.token_to_id(eod_token) is None:
            raise TokenizerError(f"{where} has no token {eod_token!r} (eod_token)")
        if pad_token is None:
            pad_token = next((t for t in PAD_CANDIDATES if tokenizer.token_to_id(t) is not None), None)
        elif tokenizer.token_to_id(pad_token) is None:
            raise TokenizerError(f"{where} has no token {pad_token!r} (pad_token)")
        self.eod_token = eod_token
        self.pad_token = pad_token
        self._eod = tokenizer.token_to_id(eod_token)
        self._pad = None if pad_token is None else tokenizer.token_to_id(pad_token)
        self._serialized = tokenizer.to_str()
        self._fingerprint = hashlib.sha256(self._serialized.encode("utf-8")).hexdigest()
        self._vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    # ---- identity -------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 of the canonical (compact) JSON serialization: same content, same fingerprint."""
        return self._fingerprint

    @property
    def unique_identifiers(self) -> "OrderedDict[str, object]":
        ids = OrderedDict()
        ids["class"] = f"{type(self).__module__}.{type(self).__qualname__}"
        ids["fingerprint"] = self._fingerprint
        ids["vocab_size"] = self._vocab_size
        ids["eod"] = self._eod
        return ids

    @property
    def unique_description(self) -> str:
        return json.dumps(self.unique_identifiers, indent=4)

    @property
    def hf_tokenizer(self) -> Tokenizer:
        return self._tok

    # ---- Megatron interface ---------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (ids are ``0 .. vocab_size - 1``)."""
        return self._vocab_size

    @property
    def vocab(self) -> dict:
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def inv_vocab(self) -> dict:
        return {i: t for t, i in self.vocab.items()}

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def eos(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        if self._pad is None:
            raise AttributeError(f"{self.path or 'this tokenizer'} has no pad token")
        return self._pad

    def tokenize(self, text: str) -> List[int]:
        """Token ids of ``text`` (no special tokens added: the caller appends ``eod``)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens are kept (``<|endoftext|>`` appears as such)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def offsets(self, ids, text):  # pragma: no cover - Megatron's optional method
        raise NotImplementedError("CoETokenizer has no method 'offsets'")

    def apply_chat_template(self, *args, **kwargs):  # pragma: no cover - not a chat tokenizer
        raise NotImplementedError("CoETokenizer has no chat template")

    # ---- files ----------------------------------------------------------------------------
    def save(self, path: str) -> str:
        """Write ``tokenizer.json`` (``path`` is a file, or a directory to hold one); its path."""
        if os.path.isdir(path) or path.endswith(os.sep):
            path = os.path.join(path, TOKENIZER_FILE)
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        self._tok.save(tmp, pretty=True)
        os.replace(tmp, path)
        self.path = path
        return path

    def save_for_transformers(self, out_dir: str, model_max_length: Optional[int] = None) -> dict:
        """``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` in
        ``out_dir``, the directory ``transformers.AutoTokenizer`` (and Megatron-LM's
        ``HuggingFaceTokenizer``) loads. Returns the special token ids ({"eos", "pad", "bos"})
        for an HF ``config.json``."""
        tokenizer_json, config_json, special_json = TRANSFORMERS_FILES
        self._tok.save(os.path.join(out_dir, tokenizer_json), pretty=True)
        special = {"eos_token": self.eod_token}
        if self.pad_token is not None:
            special["pad_token"] = self.pad_token
        config = dict(tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False,
                      add_bos_token=False, add_eos_token=False, **special)
        if model_max_length:
            config["model_max_length"] = int(model_max_length)
        for name, obj in ((config_json, config), (special_json, special)):
            with open(os.path.join(out_dir, name), "w") as f:
                json.dump(obj, f, indent=2, sort_keys=False)
                f.write("\n")
        return {"eos": self._eod, "pad": self._pad, "bos": None}

    def __repr__(self) -> str:
        return (
            f"CoETokenizer(vocab_size={self._vocab_size}, eod={self._eod}, pad={self._pad}, "
            f"fingerprint={self._fingerprint[:12]}, path={self.path!r})"
        )


def resolve_tokenizer_path(path: str) -> str:
    """``path`` itself if it is a file, ``path/tokenizer.json`` if it is a directory."""
    if os.path.isdir(path):
        candidate = os.path.join(path, TOKENIZER_FILE)
        if not os.path.isfile(candidate):
            raise TokenizerError(f"directory {path} has no {TOKENIZER_FILE}")
        return candidate
    if not os.path.isfile(path):
        raise TokenizerError(f"tokenizer file {path} does not exist")
    return path


def load_tokenizer(
    path: str, eod_token: Optional[str] = None, pad_token: Optional[str] = None
) -> CoETokenizer:
    """Load a Hugging Face ``tokenizer.json`` (a file, or a directory containing one)."""
    path = resolve_tokenizer_path(path)
    try:
        tok = Tokenizer.from_file(path)
    except Exception as err:  # tokenizers raises a bare Exception on bad JSON
        raise TokenizerError(f"cannot read tokenizer {path}: {err}") from err
    return CoETokenizer(tok, path=path, eod_token=eod_token, pad_token=pad_token)


def train_bpe_tokenizer(
    texts_iterator: Union[Iterable[str], Iterator[str]],
    vocab_size: int,
    save_path: Optional[str] = None,
    min_frequency: int = 2,
) -> CoETokenizer:
    """Train a byte-level BPE tokenizer on ``texts_iterator``; save it when ``save_path`` is given.

    Deterministic: the same texts (in any order of arrival from the iterator, as counts are
    summed) and arguments give the same tokenizer, hence the same fingerprint. ``vocab_size``
    counts the 256 byte symbols and the special tokens; a small corpus may yield fewer tokens
    (no pair left to merge), and ``CoETokenizer.vocab_size`` reports the real number.
    """
    vocab_size = int(vocab_size)
    if vocab_size < MIN_BPE_VOCAB:
        raise TokenizerError(
            f"vocab_size {vocab_size} is too small for a byte-level BPE: it needs at least "
            f"{MIN_BPE_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts_iterator, trainer=trainer)
    result = CoETokenizer(tok, eod_token=EOD_TOKEN, pad_token=PAD_TOKEN)
    if save_path is not None:
        result.save(save_path)
    return result
