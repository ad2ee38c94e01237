"""Sign-in with a lock-out after repeated failures (config/security.py counts them)."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth import views as auth_views
from django.http import HttpResponse

from config.security import client_ip, login_locked


class LoginView(auth_views.LoginView):
    """Django's sign-in page; a locked-out username and address get 429 and say so."""

    redirect_authenticated_user = True

    def form_invalid(self, form: auth_views.AuthenticationForm) -> HttpResponse:
        """Re-show the form; 429 with the reason when the pair is locked out."""
        username = str(self.request.POST.get("username", ""))
        if not login_locked(username=username, ip=client_ip(self.request)):
            return super().form_invalid(form)
        minutes = max(1, round(settings.QUORUM_LOGIN_LOCKOUT_SECONDS / 60))
        context = self.get_context_data(form=form, locked_minutes=minutes)
        response = self.render_to_response(context, status=429)
        response["Retry-After"] = str(settings.QUORUM_LOGIN_LOCKOUT_SECONDS)
        return response
