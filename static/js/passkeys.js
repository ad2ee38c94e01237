/* Passkeys for steward approvals (docs/governance.md): register one on the account page, and sign
   an approval with it on a plan's page. The challenge of an approval is SHA-256 of the canonical
   approval message, computed by the server and checked again by every site that pins the key. */
(function () {
  "use strict";

  function b64urlToBytes(text) {
    var b64 = text.replace(/-/g, "+").replace(/_/g, "/");
    while (b64.length % 4) { b64 += "="; }
    var raw = atob(b64);
    var bytes = new Uint8Array(raw.length);
    for (var i = 0; i < raw.length; i++) { bytes[i] = raw.charCodeAt(i); }
    return bytes;
  }

  function bytesToB64(buffer) {
    var bytes = new Uint8Array(buffer);
    var raw = "";
    for (var i = 0; i < bytes.length; i++) { raw += String.fromCharCode(bytes[i]); }
    return btoa(raw);
  }

  function bytesToB64url(buffer) {
    return bytesToB64(buffer).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function showError(form, message) {
    var box = form.querySelector(".passkey-error, #passkey-error");
    if (box) { box.textContent = message; box.hidden = false; }
  }

  var register = document.getElementById("passkey-register");
  if (register) {
    register.addEventListener("submit", function (event) {
      if (register.elements.credential_id.value) { return; }  // filled: submit for real
      event.preventDefault();
      if (!window.PublicKeyCredential) { showError(register, "This browser has no passkey support."); return; }
      var challenge = new Uint8Array(32);
      crypto.getRandomValues(challenge);  // registration is not attested: the site's pin is the trust anchor
      navigator.credentials.create({
        publicKey: {
          challenge: challenge,
          rp: { id: register.dataset.rpId, name: "Quorum" },
          user: {
            id: new TextEncoder().encode(register.dataset.userId),
            name: register.dataset.userName,
            displayName: register.dataset.userName
          },
          pubKeyCredParams: [{ type: "public-key", alg: -7 }, { type: "public-key", alg: -8 }],
          authenticatorSelection: { residentKey: "preferred", userVerification: "preferred" },
          attestation: "none"
        }
      }).then(function (credential) {
        var response = credential.response;
        register.elements.credential_id.value = bytesToB64url(credential.rawId);
        register.elements.algorithm.value = String(response.getPublicKeyAlgorithm());
        register.elements.public_key.value = bytesToB64(response.getPublicKey());
        register.submit();
      }).catch(function (error) { showError(register, "No passkey was created: " + error.message); });
    });
  }

  var approve = document.getElementById("approve-form");
  var button = document.getElementById("approve-passkey");
  if (approve && button) {
    button.addEventListener("click", function (event) {
      event.preventDefault();
      var ids = approve.dataset.credentials.split(" ").filter(Boolean);
      navigator.credentials.get({
        publicKey: {
          challenge: b64urlToBytes(approve.dataset.challenge),
          rpId: approve.dataset.rpId,
          allowCredentials: ids.map(function (id) { return { type: "public-key", id: b64urlToBytes(id) }; }),
          userVerification: "preferred"
        }
      }).then(function (assertion) {
        var response = assertion.response;
        approve.elements.passkey_credential_id.value = bytesToB64url(assertion.rawId);
        approve.elements.passkey_authenticator_data.value = bytesToB64url(response.authenticatorData);
        approve.elements.passkey_client_data_json.value = bytesToB64url(response.clientDataJSON);
        approve.elements.passkey_signature.value = bytesToB64url(response.signature);
        approve.submit();
      }).catch(function (error) { showError(approve, "The passkey did not sign: " + error.message); });
    });
  }
})();
