"""Websocket routes."""

from django.urls import path

from federation.consumers import AgentConsumer

websocket_urlpatterns = [path("ws/agent/", AgentConsumer.as_asgi())]
