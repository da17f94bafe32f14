"""Swagger UI as a person uses it, in headless Chromium: open /docs, press Authorize, give a key, then
"Try it out" on GET /api/v1/jobs and Execute: 200, and the request it shows carries the key. Before
authorizing, the same click gets 401: the button is what makes the difference."""

from __future__ import annotations

import json

from tests.browser import Chromium
from tests.helpers import make_key

TRY_JOBS = """
(async (key) => {
  const sleep = ms => new Promise(done => setTimeout(done, ms));
  async function find(test, what, timeout = 20000) {
    for (const end = Date.now() + timeout; Date.now() < end; await sleep(100)) {
      const found = test();
      if (found) return found;
    }
    throw new Error('not found in time: ' + what);
  }
  function type(input, text) {  // as typing does: React sees an input event
    Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(input, text);
    input.dispatchEvent(new Event('input', {bubbles: true}));
  }
  const block = (await find(() => document.querySelector(
      '.opblock-get .opblock-summary-path[data-path="/api/v1/jobs"]'), 'GET /api/v1/jobs')).closest('.opblock');
  async function execute() {
    if (!block.querySelector('.btn.execute')) {
      if (!block.querySelector('.try-out__btn')) block.querySelector('.opblock-summary-control').click();
      (await find(() => block.querySelector('.try-out__btn'), 'Try it out')).click();
    }
    const old = block.querySelector('.live-responses-table');
    if (old) block.querySelector('.btn-clear').click();
    (await find(() => block.querySelector('.btn.execute'), 'Execute')).click();
    const status = await find(() => block.querySelector('.live-responses-table tr.response .response-col_status'),
                              'the server response');
    return {status: status.textContent.trim(), curl: block.querySelector('.curl-command').textContent};
  }
  const before = await execute();
  (await find(() => document.querySelector('.btn.authorize'), 'Authorize')).click();
  const box = await find(() => [...document.querySelectorAll('.auth-container')]
      .find(c => c.textContent.includes('ApiKey')), 'the ApiKey form');
  type(box.querySelector('input'), key);
  box.querySelector('button.authorize').click();
  await find(() => box.querySelector('button.logout') || box.textContent.includes('Authorized'), 'authorized');
  document.querySelector('.btn-done, .close-modal').click();
  const after = await execute();
  return {before, after};
})
"""


def test_swagger_authorize_then_try_it_out(api_url):
    key = make_key(["read"])
    with Chromium.start() as browser:
        browser.open(f"{api_url}/docs")
        seen = browser.evaluate(f"{TRY_JOBS}({json.dumps(key)})")
    assert seen["before"]["status"].startswith("401"), seen
    assert seen["after"]["status"].startswith("200"), seen
    assert "X-API-Key" in seen["after"]["curl"] and key in seen["after"]["curl"], seen
