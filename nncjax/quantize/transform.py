"""optax-style quantization and rate transforms over pytrees, configured by regular expressions on paths.

Each tensor is named by its key path joined with ``"/"`` (``{"dense": {"kernel": w}}`` -> ``"dense/kernel"``,
list items by index), the codec's naming convention. The first rule whose pattern ``re.fullmatch``-es a
name configures that tensor; tensors that no rule matches pass through unquantized (and cost nothing).

Settings of a rule (all optional): ``qp`` (int, default -38), ``dq`` (bool, default True),
``codebook`` (int size; uniform if 0/absent, never with DQ), ``lam`` (DQ trellis rate weight),
``alpha`` (soft-round sharpness). An empty tensor has no codebook: it is quantized uniformly, as
``nncjax.encode`` codes it.

State: ``{name: {"qp": float32 scalar, ["codebook": (C,) float32]}}``, learnable. Hard mode uses
``round(qp)`` and the integer-rounded codebook, i.e. exactly what the codec writes; training modes
use the continuous step :func:`nncjax.steps.qp_to_step_continuous` so gradients reach the QPs.

>>> params = {"dense": {"kernel": jnp.full((4, 3), 0.01), "bias": jnp.zeros(3)}}
>>> rules = [(r".*kernel", dict(qp=-38, dq=True)), (r".*bias", dict(qp=-75, dq=False))]
>>> q = quantizer(rules=rules, mode="ste")
>>> state = q.init(params)
>>> qparams, aux = q.apply(state, params)             # aux[name]: {"levels", "step"}
>>> sorted(aux), qparams["dense"]["kernel"].shape
(['dense/bias', 'dense/kernel'], (4, 3))
>>> r = rate_model(rules=rules, training=True)
>>> bits = r.apply(state, params)                     # {name: float32 bits}
>>> sorted(bits), bits["dense/kernel"].shape
(['dense/bias', 'dense/kernel'], ())
"""

from __future__ import annotations

import contextlib
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from nncjax.arguments import check_flag, check_int, check_real
from nncjax.errors import InputError
from nncjax.pytree_names import key_path_name
from nncjax.quantize.codebook import codebook_init, quantize_codebook
from nncjax.quantize.dq import quantize_dq
from nncjax.quantize.uniform import MODES, quantize_uniform
from nncjax.steps import check_qp_density, qp_to_step_continuous, qp_to_step_jax

__all__ = ["QuantizerTransform", "RateTransform", "Rules", "match_rules", "path_name", "quantizer", "rate_model"]

Rules = Sequence[tuple[str, dict]]
_KNOWN = {"qp", "dq", "codebook", "lam", "alpha"}


def path_name(path) -> str:
    """A jax key path (tuple of key entries) as a ``"/"``-joined name (dict keys, attribute and
    namedtuple field names, sequence indices) -> str: the codec's names
    (:func:`nncjax.pytree_names.key_path_name`), so rules match what ``nncjax.encode`` names.

    >>> [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path({"dense": {"kernel": 0, "bias": 1}, "seq": [2]})[0]]
    ['dense/bias', 'dense/kernel', 'seq/0']
    """
    return key_path_name(path)


def _compile_rules(rules: Rules) -> list[tuple[str, re.Pattern, Any]]:
    # A bare string is a Sequence too; iterating it would yield characters, not rules.
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
        raise InputError(f"rules must be a sequence of (pattern, settings) pairs, got {type(rules).__name__}")
    out = []
    for i, rule in enumerate(rules):
        if isinstance(rule, (str, bytes)) or not isinstance(rule, Sequence) or len(rule) != 2:
            raise InputError(f"rule {i} must be a (pattern, settings) pair, got {rule!r}")
        pat, cfg = rule
        if not isinstance(pat, str):
            raise InputError(f"rule {i}: pattern must be a str, got {type(pat).__name__}")
        try:
            rx = re.compile(pat)
        except re.error as e:
            raise InputError(f"rule {i}: invalid regular expression {pat!r}: {e}") from e
        out.append((pat, rx, cfg))
    return out


def _check_settings(pat: str, cfg: Any) -> dict:
    if not isinstance(cfg, Mapping):
        raise InputError(f"rule {pat!r}: settings must be a dict, got {type(cfg).__name__}")
    bad = set(cfg) - _KNOWN
    if bad:
        raise InputError(f"unknown quantizer settings {sorted(bad)} in rule {pat!r}")
    for key in ("qp", "lam", "alpha"):
        if key in cfg:
            check_real(cfg[key], f"rule {pat!r}: {key}")
    if "dq" in cfg:
        check_flag(cfg["dq"], f"rule {pat!r}: dq")
    # A codebook size is a count; a float like 2.5 would otherwise be truncated silently by int().
    cb = check_int(cfg.get("codebook", 0), f"rule {pat!r}: codebook", lo=0)
    if cfg.get("dq", True) and cb:
        raise InputError(f"rule {pat!r}: a codebook is never combined with DQ (NNR); set dq=False")
    return dict(cfg)


def _state_of(state: Any, name: str) -> Any:
    # Checked while tracing: the state's keys are static, so this stays jit-able.
    if not isinstance(state, Mapping) or name not in state:
        raise InputError(f"state has no entry for tensor {name!r}; build it with init(params)")
    return state[name]


def match_rules(rules: Rules, params: Any) -> dict[str, dict]:
    """``{name: settings}`` for every leaf of ``params`` (any pytree) matched by a rule (first match wins);
    ``settings`` are the rule's, completed with the defaults (``qp``, ``dq``, ``codebook``, ``lam``, ``alpha``).

    >>> params = {"dense": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}
    >>> s = match_rules([(r".*kernel", dict(qp=-40)), (r".*", dict(dq=False))], params)
    >>> {name: (cfg["qp"], cfg["dq"]) for name, cfg in s.items()}
    {'dense/bias': (-38, False), 'dense/kernel': (-40, True)}

    Raises:
        InputError: ``rules`` is not a sequence of (pattern, settings) pairs, a pattern is not a valid
            regular expression, or a rule's settings are not a dict, name an unknown key, have a
            non-numeric ``qp``/``lam``/``alpha``, a non-integer or negative ``codebook``, or combine
            a codebook with DQ.
    """
    compiled = [(rx, _check_settings(pat, cfg)) for pat, rx, cfg in _compile_rules(rules)]
    out = {}
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = path_name(path)
        for rx, cfg in compiled:
            if rx.fullmatch(name):
                out[name] = {"qp": -38, "dq": True, "codebook": 0, "lam": 0.0, "alpha": 4.0} | cfg
                break
    return out


class QuantizerTransform(NamedTuple):
    """``init(params) -> state``; ``apply(state, params, rng=None) -> (quantized params, aux)``."""
    init: Callable[[Any], dict]
    apply: Callable[..., tuple[Any, dict]]


class RateTransform(NamedTuple):
    """``init(params) -> state``; ``apply(state, params) -> {name: bits}`` (float32 scalars)."""
    init: Callable[[Any], dict]
    apply: Callable[[dict, Any], dict]


@contextlib.contextmanager
def _about(name: str):
    """Name the tensor in an InputError raised while handling it (a quantizer only sees values)."""
    try:
        yield
    except InputError as e:
        raise InputError(f"tensor {name!r}: {e}") from e


def _has_codebook(cfg: dict, x: Any) -> bool:
    # An empty tensor has no values to learn a codebook from; nncjax.encode codes it uniformly too.
    return bool(cfg["codebook"]) and jnp.size(x) > 0


def _init(settings: dict[str, dict], params: Any, qp_density: int) -> dict:
    state = {}
    leaves = {path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    for name, cfg in settings.items():
        st = {"qp": jnp.float32(cfg["qp"])}
        if _has_codebook(cfg, leaves[name]):
            with _about(name):
                st["codebook"] = codebook_init(leaves[name], qp_to_step_jax(int(cfg["qp"]), qp_density),
                                               int(cfg["codebook"]))
        state[name] = st
    return state


def quantizer(rules: Rules, mode: str = "ste", *, qp_density: int = 2) -> QuantizerTransform:
    """Quantization of the tensors ``rules`` select, in ``mode`` (``hard``, ``ste``, ``noise``, ``soft``).

    ``apply`` returns the quantized pytree (same structure, float32 leaves where quantized) and
    ``aux = {name: {"levels": k, "step": step}}`` (int32 levels in hard mode, the bitstream's).
    ``mode="noise"`` needs ``rng``; each tensor gets its own fold of it.

    >>> params = {"dense": {"kernel": jnp.array([[0.01, -0.02], [0.003, 0.05]]), "bias": jnp.zeros(2)}}
    >>> q = quantizer([(r".*kernel", dict(qp=-38, dq=False))], mode="hard")
    >>> qparams, aux = q.apply(q.init(params), params)
    >>> aux["dense/kernel"]["levels"].tolist(), float(aux["dense/kernel"]["step"])
    ([[7, -14], [2, 34]], 0.00146484375)
    >>> qparams["dense"]["kernel"].tolist()                 # step * levels; the bias matched no rule
    [[0.01025390625, -0.0205078125], [0.0029296875, 0.0498046875]]

    Raises:
        InputError: ``mode`` or ``qp_density`` is invalid; ``init``/``apply``: the rules are malformed
            (:func:`match_rules`); ``apply``: ``state`` lacks a tensor the rules select, or (concrete
            values only) a hard level overflows int32 (:func:`quantize_uniform`); the message names
            the tensor. Under ``jit`` such levels saturate instead.
    """
    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}; expected one of {MODES}")
    qpd = check_qp_density(qp_density)

    def init(params):
        return _init(match_rules(rules, params), params, qpd)

    def apply(state, params, rng=None):
        settings = match_rules(rules, params)
        aux = {}

        def one(path, x):
            name = path_name(path)
            if name not in settings:
                return x
            cfg, st = settings[name], _state_of(state, name)
            key = None if rng is None else jax.random.fold_in(rng, zlib.crc32(name.encode()) & 0x7FFFFFFF)
            if mode == "hard":
                step = qp_to_step_jax(jnp.round(st["qp"]).astype(jnp.int32), qpd)
            else:
                step = qp_to_step_continuous(st["qp"], qpd)
            with _about(name):
                if _has_codebook(cfg, x):
                    k, xq = quantize_codebook(x, step, st["codebook"], "soft" if mode == "soft" else
                                              ("hard" if mode == "hard" else "ste"))
                elif cfg["dq"]:
                    k, xq = quantize_dq(x, step, mode, lam=cfg["lam"], rng=key, alpha=cfg["alpha"])
                else:
                    k, xq = quantize_uniform(x, step, mode, rng=key, alpha=cfg["alpha"])
            aux[name] = {"levels": k, "step": step}
            return xq

        out = jax.tree_util.tree_map_with_path(one, params)
        return out, aux

    return QuantizerTransform(init, apply)


def rate_model(rules: Rules, *, training: bool = True, qp_density: int = 2, **rate_kwargs) -> RateTransform:
    """Estimated DeepCABAC bits of the tensors ``rules`` select (:func:`nncjax.rate.estimate_bits`).

    ``apply(state, params) -> {name: bits}``; the state is the quantizer's (it carries the QPs), so
    ``rate_model(rules).apply(quantizer(rules).init(params), params)`` is the usual pairing. Codebook
    tensors are costed as uniform levels (no DQ). ``rate_kwargs`` go to ``estimate_bits``.

    >>> params = {"dense": {"kernel": jnp.array([[0.01, -0.02], [0.003, 0.05]]), "bias": jnp.zeros(2)}}
    >>> r = rate_model([(r".*kernel", dict(qp=-38, dq=False))], training=False)
    >>> bits = r.apply(r.init(params), params)
    >>> list(bits), round(float(bits["dense/kernel"]), 1)
    (['dense/kernel'], 91.8)

    Raises:
        InputError: ``qp_density`` is invalid; ``init``/``apply``: the rules are malformed
            (:func:`match_rules`); ``apply``: ``state`` lacks a tensor the rules select, or (concrete
            values only) a level overflows int32; the message names the tensor.
    """
    qpd = check_qp_density(qp_density)

    def init(params):
        return _init(match_rules(rules, params), params, qpd)

    def apply(state, params):
        from nncjax.rate.deepcabac import estimate_bits

        settings = match_rules(rules, params)
        leaves = {path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
        out = {}
        for name, cfg in settings.items():
            qp = _state_of(state, name)["qp"]
            with _about(name):
                out[name] = estimate_bits(leaves[name], qp if training else jnp.round(qp).astype(jnp.int32),
                                          dq=bool(cfg["dq"]) and not cfg["codebook"], qp_density=qpd,
                                          training=training, **rate_kwargs)
        return out

    return RateTransform(init, apply)
