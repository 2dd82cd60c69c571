"""Reading YAML and JSON that a person or a tool wrote, within bounds, and echoing values in
messages without repeating them whole.

A data or config file is input, not code: how deep it nests, how many values its YAML aliases
expand to and how many bytes it has are bounded here, so that a damaged or hostile file gives a
message naming it instead of a RecursionError (JSON or YAML nested 100k deep), a machine out of
memory (a 4 KB YAML "billion laughs" alias bomb expands to 10^9 values) or a crash later on.
"""

from __future__ import annotations

import json
import reprlib
from pathlib import Path

import yaml

from utils.errors import BanaError

# A config, data.yaml or COCO file nests a few levels; 100 is far beyond any of them and far
# below Python's recursion limit (the YAML composer recurses once per level).
MAX_DEPTH = 100
# The values a YAML document may hold once its aliases (*name) are expanded: a config or a
# data.yaml holds hundreds; an alias bomb reaches billions from a few kilobytes.
MAX_YAML_VALUES = 100_000
MAX_YAML_BYTES = 8 * 2**20

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxtuple = 3, 8, 8, 8
_SHORT.maxstring, _SHORT.maxother = 80, 80


def short(value) -> str:
    """repr(value) cut to a few hundred characters and three levels (deep or self-repeating
    values, as YAML aliases make them, are elided with '...'), for messages."""
    return _SHORT.repr(value)


class BoundedYamlLoader(yaml.SafeLoader):
    """SafeLoader that refuses a document nested deeper than MAX_DEPTH or whose aliases expand
    to more than MAX_YAML_VALUES values (a yaml.YAMLError naming the line). Anchors and aliases
    as a person uses them (a shared block reused a few times) still load."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._weight: dict[int, int] = {}

    def compose_node(self, parent, index):
        mark = self.peek_event().start_mark
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"the document nests more than {MAX_DEPTH} levels deep", mark)
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        weight = self._weight.get(id(node))
        if weight is None:  # an alias returns a node whose weight is known already
            weight = 1
            if isinstance(node, yaml.SequenceNode):
                weight += sum(self._weight.get(id(v), 1) for v in node.value)
            elif isinstance(node, yaml.MappingNode):
                weight += sum(self._weight.get(id(k), 1) + self._weight.get(id(v), 1)
                              for k, v in node.value)
            self._weight[id(node)] = weight  # the nodes live in the document: ids stay unique
        if weight > MAX_YAML_VALUES:
            raise yaml.composer.ComposerError(
                None, None, f"its aliases (*name) expand to more than {MAX_YAML_VALUES:,} "
                "values (an alias bomb?); write the values out, or use fewer aliases", mark)
        return node


def read_text(path, what: str, max_bytes: int = MAX_YAML_BYTES) -> str:
    """The text of a config or data file of at most `max_bytes` (else a BanaError naming it)."""
    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise BanaError(f"{what} {path} is {size:,} bytes; a file of this kind holds at most "
                        f"{max_bytes:,}: is it the right file?")
    return path.read_text()


def load_yaml(path, what: str = "YAML file"):
    """The document of a YAML data file (safe types only, bounded as `BoundedYamlLoader`);
    invalid YAML or one beyond the bounds -> BanaError naming the file."""
    text = read_text(path, what)
    try:
        return yaml.load(text, Loader=BoundedYamlLoader)
    except yaml.YAMLError as e:
        raise BanaError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None


def load_json(path, what: str = "JSON file"):
    """The document of a JSON file; invalid JSON or nesting beyond what Python's parser takes
    (RecursionError) -> BanaError naming the file. NaN and Infinity are read as floats (Python's
    json does): the readers of numbers check them (data.base.check_numbers)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except RecursionError:
        raise BanaError(f"{what} {path} nests its arrays or objects too deep to be read (deeper "
                        f"than any {what} nests): the file is damaged or not a {what}; "
                        "re-export it.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BanaError(f"{what} {path}: invalid JSON ({short(str(err))}); fix or re-export "
                        "it.") from None
