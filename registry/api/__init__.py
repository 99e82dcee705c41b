"""The Python API. Everything the ``pem`` command does is a method here.

>>> from registry import Registry
>>> reg = Registry.init("~/.pem")                       # create or upgrade the catalog
>>> info = reg.add("out/yelp-lora", "team/yelp", task="sentiment", tags={"lang": "en"})
>>> [m.ref for m in reg.list(peft_type="LORA")]
['team/yelp@1']
>>> reg.export("team/yelp", "exported/")                # a folder PeftModel.from_pretrained loads
"""

from registry.api.catalog import Catalog
from registry.api.common import parse_tag, parse_tags, read_adapter_folder
from registry.api.composing import Composing
from registry.api.hub_sync import HubSync
from registry.api.porting import Porting
from registry.api.provenance import ProvenanceQueries
from registry.api.team import Team


class Registry(Composing, ProvenanceQueries, Porting, HubSync, Team, Catalog):
    """A catalog (SQL database) plus a blob store. Open with :meth:`open` or :meth:`init`.

    The methods live in one module per concern, side by side in this package: ``catalog``
    (open, add, list, get, export, remove), ``composing`` (check, compose), ``provenance``
    (lineage, descendants, contents, verify), ``porting`` (base models, port), ``hub``
    (pull, push, sync, in ``hub_sync``) and ``team`` (aliases, tags, descriptions, cache, doctor, gc).
    """


__all__ = ["Registry", "parse_tag", "parse_tags", "read_adapter_folder"]
