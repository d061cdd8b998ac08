"""The app's routes as (path pattern, template, methods): names requests for metrics and builds
the `Allow` header of 405 answers (Starlette lists only the first route whose path matched)."""

from __future__ import annotations

from collections.abc import Iterable

from fastapi.routing import APIRoute
from starlette.routing import BaseRoute, Route
from starlette.types import Scope

UNMATCHED = "unmatched"


class RouteTable:
    def __init__(self, routes: Iterable[BaseRoute]) -> None:
        self._routes = [
            (route.path_regex, route.path, frozenset(route.methods or ()))
            for route in routes
            if isinstance(route, Route | APIRoute)
        ]

    def template(self, scope: Scope) -> str:
        """The route's path template (bounded label values); the router's choice when it routed."""
        route = scope.get("route")
        if route is not None and isinstance(getattr(route, "path", None), str):
            return route.path
        path = scope.get("path", "")
        for regex, template, _ in self._routes:
            if regex.match(path):
                return template
        return UNMATCHED

    def methods(self, path: str) -> list[str]:
        """Every method some route accepts on `path`, sorted."""
        allowed: set[str] = set()
        for regex, _, methods in self._routes:
            if regex.match(path):
                allowed |= methods
        return sorted(allowed)
