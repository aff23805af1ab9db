"""Errors every layer shares, so a bad request keeps its class from the KV plane up to the client."""


class InvalidRequest(ValueError):
    """A request that will not run as sent; the message names the offending field. Clients get a 400."""
