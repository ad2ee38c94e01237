"""Websocket routes of the dashboard (config/asgi.py adds them to federation's)."""

from channels.security.websocket import AllowedHostsOriginValidator
from django.urls import path

from dashboard.consumers import LiveConsumer

# The session cookie authenticates a browser, so a page of another site must not open this
# socket in the user's name: the Origin must be one of ALLOWED_HOSTS (cross-site hijacking).
websocket_urlpatterns = [path("ws/live/", AllowedHostsOriginValidator(LiveConsumer.as_asgi()))]
