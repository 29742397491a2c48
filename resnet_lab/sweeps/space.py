"""The search space: Hydra's sweep grammar (choice, range, interval, tag(log, interval)) in
hydra.sweeper.params and on the command line, as Optuna distributions, and the values a check
or the grid sampler tries of each."""

from typing import Dict, List, Sequence, Tuple

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer

from resnet_lab.errors import UserError


def _distribution(override: Override):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    shown = override.input_line
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        choices = list(override.sweep_iterator(transformer=Transformer.encode))
        if not choices:
            raise UserError(f"{shown}: no values to choose from")
        return CategoricalDistribution(choices)
    if override.is_range_sweep():
        values = list(override.sweep_iterator())
        if not values:
            raise UserError(f"{shown}: the range is empty; range(start, stop, step) takes start up to, not "
                            f"including, stop")
        if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            return IntDistribution(values[0], values[-1], step=value.step)
        return FloatDistribution(values[0], values[-1], step=value.step)
    if override.is_interval_sweep():
        low, high, log = value.start, value.end, "log" in value.tags
        if not low < high:
            raise UserError(f"{shown}: the interval is empty or inverted; interval(low, high) needs low < high")
        if log and low <= 0:
            raise UserError(f"{shown}: a log interval needs low > 0")
        if isinstance(low, int) and isinstance(high, int):
            return IntDistribution(low, high, log=log)
        return FloatDistribution(float(low), float(high), log=log)
    raise UserError(f"{shown}: the search takes choice, range, interval and tag(log, interval)")


def parse(arguments: Sequence[str]) -> Tuple[Dict[str, object], List[str]]:
    """(name: distribution, the other overrides as given); a later override of a key wins."""
    space, fixed = {}, {}
    for override in OverridesParser.create().parse_overrides(list(arguments)):
        key = override.get_key_element()
        space.pop(key, None)
        fixed.pop(key, None)
        if override.is_sweep_override():
            space[key] = _distribution(override)
        else:
            fixed[key] = override.input_line
    return space, list(fixed.values())


def values(distribution) -> list:
    """The values of a distribution that a check composes (its ends, or every choice), or that
    the grid sampler takes (every value; None for a continuous one)."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    return [distribution.low, distribution.high]


def grid(distribution):
    """Every value of a discrete distribution; None for a continuous one."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    if distribution.step is None or (distribution.log and not isinstance(distribution, IntDistribution)):
        return None
    count = round((distribution.high - distribution.low) / distribution.step) + 1
    return [distribution.low + i * distribution.step for i in range(count)]


def as_overrides(params: Dict[str, object]) -> List[str]:
    return [f"{name}={value}" for name, value in params.items()]
