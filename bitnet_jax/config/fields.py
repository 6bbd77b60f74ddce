"""The parts of the config's field table: a rule per field, a resume class.

`bitnet_jax.config.defaults.FIELDS` holds one `Field` per config key: its
default,
its `Rule` (the values allowed), its resume class and a one-line doc.
`bitnet_jax.config.validate` checks every field against its rule, and
`bitnet_jax.runs.identity` reads the resume class.

A rule checks the Python type as well as the range: ml_collections'
ConfigDict lets None, a bool in an int field, and anything set under
`ignore_type()` through (measured: `bitnet_jax.config`'s docstring).
"""

from __future__ import annotations

import dataclasses
import enum
import numbers
from typing import Any, NamedTuple

# Resume classes (bitnet_jax.runs.identity): what a resume may change.
IDENTITY = "identity"  # what the run trains: a change is refused
SCHEDULE = "schedule"  # when things happen: accepted with a WARNING
RUNTIME = "runtime"  # no effect on the math: accepted with an INFO line
RESUME_CLASSES = (IDENTITY, SCHEDULE, RUNTIME)


@dataclasses.dataclass(frozen=True)
class Rule:
  """The values one field allows.

  Attributes:
    kind: "integer", "number" (a real), "choice", "flag" (a bool), "text".
    low, high: bounds of an integer or number, None for unbounded.
    low_open, high_open: whether the bound itself is excluded.
    choices: the allowed values of a "choice" (plain strings).
    special: (value, meaning) allowed beside the bounds, e.g. (-1, "fill").
  """
  kind: str
  low: float | None = None
  high: float | None = None
  low_open: bool = False
  high_open: bool = False
  choices: tuple = ()
  special: tuple[Any, str] | None = None

  def accepts(self, value: Any) -> bool:
    """Whether `value` (type and range) is allowed."""
    if self.kind == "flag":
      return isinstance(value, bool)
    if self.kind == "text":
      return isinstance(value, str)
    if self.kind == "choice":
      return isinstance(value, str) and value in self.choices
    wanted = int if self.kind == "integer" else numbers.Real
    if not isinstance(value, wanted) or isinstance(value, bool):
      return False
    if self.special is not None and value == self.special[0]:
      return True
    return ((self.low is None or value > self.low
             or (value == self.low and not self.low_open))
            and (self.high is None or value < self.high
                 or (value == self.high and not self.high_open)))

  def allowed(self) -> str:
    """The allowed values in words, e.g. "must be an integer >= 1"."""
    if self.kind == "flag":
      return "must be True or False"
    if self.kind == "text":
      return "must be a string"
    if self.kind == "choice":
      return f"allowed values are {', '.join(map(repr, self.choices))}"
    noun = "an integer" if self.kind == "integer" else "a number"
    if self.low is not None and self.high is not None:
      interval = (f"{'(' if self.low_open else '['}{_num(self.low)}, "
                  f"{_num(self.high)}{')' if self.high_open else ']'}")
      text = (f"{noun} in {interval}" if self.kind == "integer"
              else f"lie in {interval}")
    elif self.low is not None:
      text = f"{noun} {'>' if self.low_open else '>='} {_num(self.low)}"
    elif self.high is not None:
      text = f"{noun} {'<' if self.high_open else '<='} {_num(self.high)}"
    else:
      text = noun
    if self.special is not None:
      value, meaning = self.special
      return f"must be {value!r} ({meaning}) or {text}"
    return f"must {text}" if text.startswith("lie") else f"must be {text}"


def _num(bound: float) -> str:
  return repr(int(bound)) if float(bound).is_integer() else repr(bound)


def _bounds(kind: str, bounds: str, special) -> Rule:
  """A Rule from "", ">= a", "> a", "<= b", "< b" or "[a, b)"-style text.

  Raises:
    ValueError: for text of another form (a mistake in the table).
  """
  text = bounds.strip()
  try:
    if not text:
      return Rule(kind, special=special)
    for op in (">=", "<=", ">", "<"):
      if text.startswith(op):
        bound = float(text[len(op):])
        if op[0] == ">":
          return Rule(kind, low=bound, low_open=op == ">", special=special)
        return Rule(kind, high=bound, high_open=op == "<", special=special)
    if text[0] in "[(" and text[-1] in "])":
      low, high = (float(part) for part in text[1:-1].split(","))
      return Rule(kind, low=low, high=high, low_open=text[0] == "(",
                  high_open=text[-1] == ")", special=special)
  except ValueError:
    pass  # not numbers, or not two of them
  raise ValueError(f"bounds {bounds!r}: use '', '>= a', '> a', '<= b', "
                   "'< b' or an interval such as '[0, 1)'")


def integer(bounds: str = "", special: tuple[Any, str] | None = None
            ) -> Rule:
  """An int (not a bool) within `bounds`, e.g. ">= 1" or "[2, 4]"."""
  return _bounds("integer", bounds, special)


def number(bounds: str = "", special: tuple[Any, str] | None = None
           ) -> Rule:
  """A real number (not a bool) within `bounds`, e.g. "> 0" or "[0, 1)"."""
  return _bounds("number", bounds, special)


def choice(choices: type[enum.StrEnum]) -> Rule:
  """One of the values of the enum `choices` (`bitnet_jax.config.choices`),
  kept as plain strings: the allowed values in messages read 'a', 'b'."""
  return Rule("choice", choices=tuple(member.value for member in choices))


FLAG = Rule("flag")  # True or False
TEXT = Rule("text")  # any string; formats are checked by `validate`


class Field(NamedTuple):
  """One line of the field table.

  Attributes:
    key: the dotted config key, e.g. "train.steps".
    default: the value of `base_config()`; its Python type is the field's
      type in the ConfigDict (a number field needs a float default).
    rule: the allowed values.
    resume: IDENTITY, SCHEDULE or RUNTIME.
    doc: what the field means, in one line.
  """
  key: str
  default: Any
  rule: Rule
  resume: str
  doc: str

  def error(self, value: Any) -> str | None:
    """None if `value` is allowed, else the ConfigError message."""
    if self.rule.accepts(value):
      return None
    return (f"config.{self.key}={value!r} is invalid: "
            f"{self.rule.allowed()} ({self.doc}).")


def field_table(*fields: Field) -> dict[str, Field]:
  """{key: field} in table order.

  Raises:
    ValueError: for a key listed twice or an unknown resume class.
  """
  table: dict[str, Field] = {}
  for field in fields:
    if field.key in table:
      raise ValueError(f"config field {field.key!r} is listed twice")
    if field.resume not in RESUME_CLASSES:
      raise ValueError(f"config field {field.key!r}: resume class "
                       f"{field.resume!r} is not one of {RESUME_CLASSES}")
    table[field.key] = field
  return table
