"""The methods a needle test compares, by name: the full cache, every eviction policy, the kvpress presets, and
every KV quantization method.

``full``              the full cache: the baseline every method is judged against
``evict:<policy>``    a :data:`kvcore.eviction.POLICIES` policy that frees storage, with its default hyperparameters
``kvpress:<press>``   the policy that keeps what kvpress 0.5.5's press keeps, with the press's own defaults
                      (:func:`~kvcore.eviction.kvpress_compatible`; a share budget truncated as kvpress counts it)
``quant:<method>``    a :data:`kvcore.quant.methods.METHODS` method (every token kept, stored compressed)

A bare name is read as ``evict:<name>`` when a policy has it, else ``quant:<name>``.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcore.eviction import POLICIES, Budget, EvictionPolicy, kvpress_compatible, make_policy, resolve_budget
from kvcore.eviction.kvpress import PRESSES
from kvcore.quant.methods import METHODS as QUANT_METHODS
from kvcore.quant.methods import QuantMethod

KINDS = ("full", "evict", "kvpress", "quant")
DEFAULT_METHODS: tuple[str, ...] = ("full", "evict:sliding_window", "evict:streaming_llm", "evict:h2o",
                                    "evict:snapkv", "kvpress:snapkv", "quant:kivi-2")


@dataclass(slots=True, frozen=True)
class NeedleMethod:
    """One method by name (see the module doc). kind: one of :data:`KINDS`; key: the policy, press or quantizer."""

    name: str
    kind: str
    key: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def budgeted(self) -> bool:
        """Whether the method keeps a budget of tokens (eviction and kvpress presets)."""
        return self.kind in ("evict", "kvpress")

    def policy(self, seed: int = 0) -> EvictionPolicy | None:
        """The eviction policy (the random policy seeded by ``seed``), or None for the full cache and quantizers."""
        if self.kind == "evict":
            return make_policy(self.key, seed=seed) if self.key == "random" else make_policy(self.key)
        if self.kind == "kvpress":
            return kvpress_compatible(self.key)
        return None

    def quantizer(self) -> QuantMethod | None:
        """The quantization method, or None."""
        return QUANT_METHODS[self.key] if self.kind == "quant" else None

    def kept(self, budget: Budget, length: int) -> int:
        """Tokens kept of ``length`` at ``budget`` (tokens, or a share: rounded; kvpress presets truncate)."""
        return resolve_budget(budget, length, "kvpress" if self.kind == "kvpress" else "round")

    def label(self) -> str:
        """What the method is, with its settings (the eviction table's ``label`` for a policy)."""
        if self.kind == "full":
            return "full cache"
        if self.kind == "quant":
            method = self.quantizer()
            return f"{method.name} ({method.describe()})"
        return self.policy().label()


def needle_methods() -> dict[str, NeedleMethod]:
    """Every method by name, in the order tables list them."""
    evicting = [name for name, cls in POLICIES.items() if not (cls.keeps_all or cls.stores_all)]
    return {"full": NeedleMethod("full", "full")} | \
        {f"evict:{p}": NeedleMethod(f"evict:{p}", "evict", p) for p in evicting} | \
        {f"kvpress:{p}": NeedleMethod(f"kvpress:{p}", "kvpress", p) for p in PRESSES} | \
        {f"quant:{q}": NeedleMethod(f"quant:{q}", "quant", q) for q in QUANT_METHODS}


def method_named(name: str) -> NeedleMethod:
    """The method ``name`` (a bare policy or quantizer name is accepted); ValueError naming the choices."""
    methods = needle_methods()
    for candidate in (name, f"evict:{name}", f"quant:{name}"):
        if candidate in methods:
            return methods[candidate]
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(methods)}")
