// The web UI in a real browser: Debian's Chromium driven by playwright-core (from npm,
// pinned; `cargo xtask test` installs both). Run by tests/tests/web_ui.rs with one JSON
// argument:
//   {"base": "http://127.0.0.1:PORT", "token": "...", "service": "...", "window": "ID",
//    "search": "function to search for", "out": "dir for screenshots and downloads",
//    "node_modules": "dir holding playwright-core"}
// ("start" optionally: the services page's path with its range.)
// It signs in, opens the services page, follows the service to its timeline, selects a
// range on it and compares, opens the window, reads the top cause from the rendered
// report, follows it to the cause's flame graph, widens the filter to every cause, zooms
// into a frame, searches, resets,
// and downloads the pprof. It prints one JSON line with what it saw; it fails on any
// console error, page error, dialog (an injected script would raise one) or request to
// another origin.
import { createRequire } from 'node:module';
import path from 'node:path';
import fs from 'node:fs';

const config = JSON.parse(process.argv[2]);
const require = createRequire(path.join(config.node_modules, 'noop.js'));
const { chromium } = require('playwright-core');

const problems = [];
const seen = {};

function check(condition, message) {
  if (!condition) { throw new Error(message); }
}

// The service's name is markup (`<img src=x onerror=alert(1)>`): on every page it must
// be text, so no <img> element may exist (the pages have none of their own).
async function noInjectedMarkup(page, where) {
  check(await page.locator('img').count() === 0, 'an <img> element exists on the ' + where + ' page: a label was not escaped');
}

async function shot(page, name) {
  const file = path.join(config.out, name + '.png');
  await page.screenshot({ path: file, fullPage: true });
  return file;
}

// A fresh profile for every run (launchPersistentContext passes it as --user-data-dir).
const profileDir = fs.mkdtempSync(path.join(config.out, 'chromium-profile-'));
const context = await chromium.launchPersistentContext(profileDir, {
  executablePath: '/usr/bin/chromium',
  headless: true,
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
  acceptDownloads: true,
  viewport: { width: 1400, height: 900 },
});
try {
  const page = await context.newPage();
  page.setDefaultTimeout(30000);
  page.on('console', (msg) => {
    if (msg.type() === 'error' || msg.type() === 'warning') { problems.push('console ' + msg.type() + ': ' + msg.text()); }
  });
  page.on('pageerror', (err) => problems.push('page error: ' + err.message));
  page.on('dialog', async (dialog) => {
    problems.push('dialog (an injected script ran?): ' + dialog.message());
    await dialog.dismiss();
  });
  page.on('request', (request) => {
    const url = request.url();
    if (!url.startsWith(config.base + '/') && !url.startsWith('data:')) { problems.push('request to another origin: ' + url); }
  });
  page.on('requestfailed', (request) => {
    // A navigation replaced by the next one is not a failure of the UI.
    const failure = request.failure();
    if (failure && !/ERR_ABORTED/.test(failure.errorText)) { problems.push('request failed: ' + request.url() + ' ' + failure.errorText); }
  });

  // Signing in: the services page sends us to the login page first, and back after.
  await page.goto(config.base + (config.start || '/services'));
  check(new URL(page.url()).pathname === '/login', 'not sent to the login page: ' + page.url());
  await shot(page, 'login');
  await page.fill('input[name=token]', 'not-the-token');
  await page.click('button[type=submit]');
  check(await page.locator('p.error').count() === 1, 'a wrong token was not refused');
  await page.fill('input[name=token]', config.token);
  await Promise.all([page.waitForURL('**/services**'), page.click('button[type=submit]')]);
  const cookies = await context.cookies();
  const cookie = cookies.find((c) => c.name === 'stallscope_token');
  check(cookie && cookie.httpOnly && cookie.sameSite === 'Strict', 'the token cookie is not HttpOnly and SameSite=Strict: ' + JSON.stringify(cookies));

  // Services: the service's row, its chart, its open-first order.
  const serviceLinks = page.locator('a.svc', { hasText: config.service });
  check(await serviceLinks.count() >= 1, 'the service is not listed on the services page');
  seen.services_rows = await page.locator('table.services tbody tr').count();
  seen.services_charts = await page.locator('table.services svg.spark').count();
  seen.service_text = await serviceLinks.first().textContent();
  await noInjectedMarkup(page, 'services');
  seen.screenshot_services = await shot(page, 'services');

  // The service's timeline, with the window shaded.
  await Promise.all([page.waitForURL('**/service?**'), serviceLinks.first().click()]);
  const timeline = page.locator('svg.timeline');
  check(await timeline.count() === 1, 'no timeline on the service page');
  seen.timeline_bars = await page.locator('svg.timeline path').count();
  seen.window_tabs = await page.locator('svg.timeline a.wintab').count();
  check(seen.window_tabs >= 1, 'the window is not shaded on the timeline');
  await noInjectedMarkup(page, 'service');
  seen.screenshot_service = await shot(page, 'service');

  // A drag across the window's span selects it; its flame graph appears; compare.
  const span = await page.locator('svg.timeline rect.win').first().boundingBox();
  const box = await timeline.boundingBox();
  const y = box.y + box.height / 2;
  await page.mouse.move(span.x + 2, y);
  await page.mouse.down();
  await page.mouse.move(span.x + span.width / 2, y, { steps: 4 });
  await page.mouse.move(Math.max(span.x + span.width - 2, span.x + 8), y, { steps: 4 });
  await Promise.all([page.waitForURL('**sel_from=**'), page.mouse.up()]);
  check(await page.locator('section.selection svg.flame').count() === 1, 'selecting a range showed no flame graph');
  seen.selection_url = page.url();
  await Promise.all([page.waitForURL('**base_from=**'), page.locator('a.compare').click()]);
  check(await page.locator('section.selection svg.flame[data-diff="1"]').count() === 1, 'compare showed no differential flame graph');
  seen.screenshot_compare = await shot(page, 'service-compare');

  // The window's `why` report.
  await Promise.all([page.waitForURL('**/windows/**'), page.locator('a.window-link', { hasText: config.window }).click()]);
  check(await page.locator('#verdict').count() === 1, 'no verdict on the window page');
  seen.verdict = await page.locator('#verdict').textContent();
  seen.summary = await page.locator('#summary').textContent();
  const top = page.locator('tr.cause.ranked[data-rank="1"]');
  seen.top_cause = (await top.count()) === 1 ? await top.getAttribute('data-category') : null;
  seen.ranked = await page.locator('tr.cause.ranked').count();
  seen.evidence_rows = await page.locator('table.evidence tbody tr').count();
  check((await page.locator('body').textContent()).includes(config.service), 'the window page does not show the service name as text');
  await noInjectedMarkup(page, 'window');
  seen.screenshot_window = await shot(page, 'window');

  // The top cause's flame graph, from the report's link; zoom into a frame.
  const causeLink = seen.top_cause
    ? page.locator('section.cause-detail[data-category="' + seen.top_cause + '"] p.actions a').first()
    : page.locator('td.links a').first();
  await Promise.all([page.waitForURL('**/flame?**'), causeLink.click()]);
  const flame = page.locator('svg.flame');
  check(await flame.count() === 1, 'no flame graph');
  seen.cause_flame_url = page.url();
  seen.cause_flame_frames = await page.locator('svg.flame g.fr').count();
  check(new URL(page.url()).searchParams.get('cause') === seen.top_cause, 'the cause link does not filter by the cause: ' + page.url());

  // The filter form: every cause of the same range, so the frame to zoom into has
  // siblings (the request's compute and its downstream wait).
  await page.selectOption('form.filters select[name=cause]', '');
  await Promise.all([page.waitForURL((url) => !url.searchParams.get('cause')), page.click('form.filters button[type=submit]')]);
  check(await flame.count() === 1, 'no flame graph without the cause filter');
  seen.flame_url = page.url();
  seen.flame_frames = await page.locator('svg.flame g.fr').count();
  const target = config.search
    ? page.locator('svg.flame g.fr', { has: page.locator('title', { hasText: config.search }) }).first()
    : page.locator('svg.flame g.fr[data-d="3"]').first();
  check(await target.count() === 1, 'no frame to zoom into (' + config.search + ')');
  const widthBefore = await target.locator('rect').getAttribute('width');
  seen.zoom_frame = (await target.locator('title').textContent()).split('\n')[0];
  seen.hidden_before_zoom = await page.locator('svg.flame g.fr.hidden').count();
  await target.click();
  const widthAfter = await target.locator('rect').getAttribute('width');
  seen.zoom_width_before = widthBefore;
  seen.zoom_width_after = widthAfter;
  check(parseFloat(widthBefore) < 100, 'the frame to zoom into already spans the graph: ' + widthBefore);
  check(widthAfter === '100.0000%', 'zooming did not widen the frame: ' + widthBefore + ' -> ' + widthAfter);
  seen.hidden_after_zoom = await page.locator('svg.flame g.fr.hidden').count();
  check(seen.hidden_after_zoom > seen.hidden_before_zoom, 'zooming hid no frame outside the zoomed one');
  await noInjectedMarkup(page, 'flame graph');
  seen.screenshot_flame = await shot(page, 'flame');
  if (config.search) {
    await page.fill('#flame-search', config.search);
    await page.waitForFunction(() => document.getElementById('flame-matched').textContent.length > 0);
    seen.search_matched = await page.locator('#flame-matched').textContent();
    seen.search_hits = await page.locator('svg.flame g.fr.match').count();
  }
  await page.click('#flame-reset');
  seen.hidden_after_reset = await page.locator('svg.flame g.fr.hidden').count();
  check(seen.hidden_after_reset === 0, 'reset left frames hidden');

  // The pprof download.
  const [download] = await Promise.all([
    page.waitForEvent('download'),
    page.locator('a.download', { hasText: 'pprof' }).click(),
  ]);
  seen.pprof = path.join(config.out, 'flame.pb.gz');
  await download.saveAs(seen.pprof);
  seen.pprof_name = download.suggestedFilename();

  // Signing out: the pages are closed again.
  await Promise.all([page.waitForURL('**/login**'), page.click('form.signout button')]);
  await page.goto(config.base + '/services');
  check(new URL(page.url()).pathname === '/login', 'still signed in after signing out');
} catch (err) {
  problems.push('step failed: ' + err.message);
} finally {
  await context.close();
  fs.rmSync(profileDir, { recursive: true, force: true });
}
process.stdout.write(JSON.stringify({ problems, seen }) + '\n');
process.exit(problems.length === 0 ? 0 : 1);
