from __future__ import annotations

from drf_spectacular.utils import extend_schema, extend_schema_serializer, inline_serializer
from rest_framework import serializers
from rest_framework.authentication import BaseAuthentication
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.accounts.services import token_obtain
from apps.common.throttles import SignInThrottle


class TokenObtainApi(APIView):
    authentication_classes: list[type[BaseAuthentication]] = []
    permission_classes = [AllowAny]
    throttle_classes = [SignInThrottle]  # each call costs a password hash; lockout per account: django-axes

    @extend_schema_serializer(component_name="TokenInput")
    class InputSerializer(serializers.Serializer[dict[str, str]]):
        username = serializers.CharField(min_length=1, max_length=150)
        password = serializers.CharField(min_length=1, max_length=4096, style={"input_type": "password"})
        name = serializers.CharField(required=False, allow_blank=True, max_length=100)

    @extend_schema(
        request=InputSerializer,
        responses=inline_serializer("TokenOutput", {"token": serializers.CharField()}),
    )
    def post(self, request: Request) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        return Response({"token": token_obtain(request=request._request, **data.validated_data)})
