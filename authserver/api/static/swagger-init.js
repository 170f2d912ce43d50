// Starts the Swagger UI with the settings the page carries as JSON (see swagger.html):
// a file of its own, so that the page needs no inline script.
"use strict";
(function () {
  var config = JSON.parse(document.getElementById("swagger-config").textContent);
  var ui = SwaggerUIBundle(Object.assign({}, config.parameters, {
    url: config.openapiUrl,
    dom_id: "#swagger-ui",
    oauth2RedirectUrl: window.location.origin + config.oauth2RedirectUrl,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
  }));
  ui.initOAuth(config.initOAuth);
  window.ui = ui;
})();
