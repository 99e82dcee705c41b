"""The registry as a service (``pem serve``): a JSON API over :mod:`registry.api`.

``app`` (FastAPI, imported only by ``pem serve`` and the tests) translates HTTP to calls of
:class:`registry.Registry` and :class:`registry.errors.PemError` subclasses to status codes;
``tokens`` and ``permissions`` hold who may do what; neither imports FastAPI, so the host-side
``pem token`` commands and the client stay light.
"""

API_VERSION = 1  # the JSON API's version (/api/v1/); the client refuses a server that speaks another
