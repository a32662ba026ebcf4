"""The playground page and the offline API docs in a real headless Chromium (Debian's, through Playwright)."""

from pathlib import Path

import pytest

playwright = pytest.importorskip("playwright.sync_api", reason="scripts/setup.sh --dev installs playwright")

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is missing (apt-get install chromium; scripts/setup.sh --dev does it as root)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


def offline_page(browser, base_url: str):
    """A page that may load nothing but the server under test: no CDN can help it."""
    page = browser.new_page(viewport={"width": 1150, "height": 900})
    page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(base_url) else route.abort())
    errors = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return page, errors


def test_a_generation_in_the_playground(server_factory, browser):
    server = server_factory("--max-batch-rows", "16", env={"RACEDIT_API_KEY": "pw-key"})
    page, errors = offline_page(browser, server.url)
    page.on("dialog", lambda dialog: dialog.accept("pw-key"))  # the page asks for the key once
    held = []  # the model card's requests, answered only once the loading state has been looked at
    page.route("**/v1/models", lambda route: held.append(route))
    page.goto(server.url + "/")
    assert page.get_attribute("body", "data-state") == "loading" and page.is_disabled("#generate")
    assert "loading the model card" in page.inner_text("#model-info")
    assert not page.is_visible("#legend") and not page.is_visible("#charts")  # nothing to show yet
    page.unroute("**/v1/models")
    for route in held:
        route.continue_()
    page.wait_for_selector("body[data-state=ready]", timeout=30_000)
    assert page.locator("#class option").count() == 10 and page.is_enabled("#generate")
    assert "racedit-tiny" in page.inner_text("#model-info")
    assert page.locator("#sampler option").count() == 6 and page.input_value("#sampler") == "euler"
    page.select_option("#class", "6")
    page.select_option("#sampler", "ddpm")
    page.fill("#steps", "10")
    page.fill("#seed", "3")
    page.fill("#num-images", "2")
    page.fill("#preview-every", "3")
    page.click("#generate")
    page.wait_for_selector("body[data-state=done]", timeout=60_000)
    assert page.inner_text("#timing")
    assert page.evaluate("document.getElementById('progress-bar').style.width") == "100%"
    assert "2 x star" in page.inner_text("#progress-text") and "seed 3" in page.inner_text("#progress-text")
    assert "10 ddpm steps" in page.inner_text("#progress-text")
    assert page.locator("#images img").count() == 2
    assert page.evaluate(
        "[...document.querySelectorAll('#images img')].every(i => i.complete && i.naturalWidth === 16)"
    )
    assert not page.is_visible("#legend")  # the overlay is off
    page.check("#heatmap-toggle")
    assert page.is_visible("canvas.heatmap") and page.is_visible("#legend")
    low, high = (float(page.inner_text(f"#legend-{end}").split()[0]) for end in ("min", "max"))
    assert 0 <= low < high
    colours = page.evaluate("""() => {
        const canvas = document.querySelector('canvas.heatmap');
        const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        const seen = new Set();
        for (let i = 0; i < data.length; i += 4) seen.add(`${data[i]},${data[i + 1]},${data[i + 2]}`);
        return seen.size;
    }""")
    assert colours > 50, "the heat map should vary across the image"
    assert page.locator("#layer-charts canvas").count() == 2  # the tiny preset's two MoE layers
    assert page.is_visible("#charts")
    unauthorized = [e for e in errors if "401" in e]
    assert len(unauthorized) == 1  # the first call, before the page asked for the key; never again
    assert [e for e in errors if "401" not in e] == []


def test_the_api_docs_load_offline(server_factory, browser):
    server = server_factory()
    page, errors = offline_page(browser, server.url)
    page.goto(server.url + "/docs")
    page.wait_for_selector(".swagger-ui .info .title", timeout=30_000)
    assert "racedit" in page.inner_text(".swagger-ui .info .title")
    assert page.locator(".opblock-summary-path", has_text="/generate/stream").count() == 1
    assert errors == []


def test_the_readme_screenshot_is_the_page_after_a_generation(server_factory, browser):
    """docs/playground.png is taken here, from the bundled model, so it shows the page as it is now."""
    from racedit.model import bundled

    server = server_factory("--max-batch-rows", "16", checkpoint=bundled())
    page, errors = offline_page(browser, server.url)
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-state=ready]", timeout=60_000)
    assert page.locator("#sampler option").count() == 6 and page.input_value("#sampler") == "euler"
    page.select_option("#class", "6")
    page.select_option("#sampler", "ddpm")
    page.fill("#steps", "25")
    page.fill("#seed", "3")
    page.fill("#num-images", "4")
    page.check("#heatmap-toggle")
    page.click("#generate")
    page.wait_for_selector("body[data-state=done]", timeout=120_000)
    assert page.locator("#images img").count() == 4 and page.is_visible("#legend") and page.is_visible("#charts")
    assert "racedit-shapes10" in page.inner_text("#model-info") and "4 x star" in page.inner_text("#progress-text")
    assert errors == []
    page.screenshot(path=str(Path(__file__).resolve().parents[2] / "docs" / "playground.png"), full_page=True)
