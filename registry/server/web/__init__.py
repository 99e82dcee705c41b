"""The web view of ``pem serve``: read-only pages over :mod:`registry.api`, rendered on the
server with Jinja2 (templates and static assets in this package, nothing from another host)."""
