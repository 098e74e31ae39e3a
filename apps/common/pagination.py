"""Lists come a page at a time, newest first, with stable cursors (no offsets to drift while
new rows arrive): `{next, previous, results}`; `?page_size=` up to 200."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from drf_spectacular.utils import inline_serializer
from rest_framework import serializers
from rest_framework.pagination import CursorPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView


class NewestFirst(CursorPagination):
    page_size = 50
    max_page_size = 200
    page_size_query_param = "page_size"
    ordering = ("-created_at", "-id")


def paginated_response(
    queryset: QuerySet[Any], request: Request, serializer_class: type[serializers.BaseSerializer[Any]], view: APIView
) -> Response:
    paginator = NewestFirst()
    page = paginator.paginate_queryset(queryset, request, view=view)
    return paginator.get_paginated_response(serializer_class(page, many=True).data)


def paginated(serializer_class: type[serializers.BaseSerializer[Any]], name: str) -> serializers.Serializer[Any]:
    """The schema of one page of `serializer_class` items."""
    return inline_serializer(
        name,
        {
            "next": serializers.URLField(allow_null=True),
            "previous": serializers.URLField(allow_null=True),
            "results": serializer_class(many=True),
        },
    )
