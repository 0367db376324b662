// Open a study in the real OHIF viewer (headless Chromium via puppeteer-core), load one SEG series
// as a labelmap the way a user does (double-click its thumbnail in the study browser; with
// disableConfirmationPrompts OHIF hydrates it at once), then dump OHIF's OWN labelmap: every
// labelmap layer's voxels (base64) with the geometry cornerstone3D keeps for them, OHIF's segment
// list, the console log, page errors, failed requests and OHIF's notifications.
//
//   node check_seg.mjs --chromium /usr/bin/chromium --url http://127.0.0.1:PORT \
//        --study STUDY_UID --seg-series SEG_SERIES_UID --out report.json [--timeout-ms 240000] \
//        [--node-modules DIR] [--screenshot shot.png]
//
// Exit status: 0 = labelmap dumped and no SEG/segmentation error in the console (SEG-related
// warnings are listed in "segWarnings"); 1 = a SEG or
// segmentation error was logged (the dump is still written); 2 = the check could not finish
// (timeout, crash, no labelmap): report.json then holds "failure" and whatever was collected.
// puppeteer-core is found in --node-modules or $NODE_PATH (ESM imports ignore NODE_PATH, hence createRequire).
import { createRequire } from 'node:module';
import fs from 'node:fs';
import path from 'node:path';

function parseArgs(argv) {
  const out = { timeoutMs: 240000 };
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, '').replace(/-([a-z])/g, (_, c) => c.toUpperCase());
    out[key] = argv[i + 1];
  }
  for (const need of ['chromium', 'url', 'study', 'segSeries', 'out']) {
    if (!out[need]) throw new Error(`missing --${need.replace(/[A-Z]/g, c => '-' + c.toLowerCase())}`);
  }
  out.timeoutMs = Number(out.timeoutMs);
  return out;
}

const args = parseArgs(process.argv.slice(2));
const nodeModules = args.nodeModules || (process.env.NODE_PATH || '').split(path.delimiter)[0];
const require = createRequire(path.join(path.resolve(nodeModules || '.'), 'noop.js'));
const puppeteer = require('puppeteer-core');

const report = {
  url: args.url, study: args.study, segSeries: args.segSeries,
  console: [], pageErrors: [], failedRequests: [], notifications: [], steps: [],
};
const t0 = Date.now();
const step = name => { report.steps.push([name, Date.now() - t0]); console.log(`[${Date.now() - t0} ms] ${name}`); };
const write = () => fs.writeFileSync(args.out, JSON.stringify(report));
// Errors that mean OHIF could not parse or place the SEG (dcmjs adapters, cornerstone segmentation).
const SEG_ERROR = /\bseg\b|segment|labelmap|dcmjs|adapter|frames? out of plane|referenced/i;

let browser;
const pending = [];  // console arguments still being fetched from the page
const hardTimer = setTimeout(async () => {
  report.failure = `hard timeout after ${args.timeoutMs} ms (last step: ${report.steps.at(-1)?.[0]})`;
  write();
  console.error(report.failure);
  try { await browser?.close(); } catch { /* exiting anyway */ }
  process.exit(2);
}, args.timeoutMs);

async function main() {
  browser = await puppeteer.launch({
    executablePath: args.chromium,
    headless: true,
    protocolTimeout: args.timeoutMs,
    // SwiftShader gives WebGL without a GPU; no sandbox because CI runs as root in a container.
    args: ['--no-sandbox', '--disable-dev-shm-usage', '--use-angle=swiftshader', '--enable-unsafe-swiftshader',
           '--window-size=1280,900', '--no-first-run', '--no-default-browser-check'],
  });
  report.browserVersion = await browser.version();
  const page = await browser.newPage();
  await page.setViewport({ width: 1280, height: 900 });
  page.setDefaultTimeout(args.timeoutMs);
  page.on('console', msg => {
    const loc = msg.location();
    const entry = { type: msg.type(), text: msg.text().slice(0, 2000), url: loc?.url ?? null };
    report.console.push(entry);
    // OHIF's SEG loader logs its parse summary as an object; keep it readable (JSON).
    if (entry.text.startsWith('[SEG load]')) {
      pending.push(Promise.all(msg.args().map(a => a.jsonValue().catch(() => null)))
        .then(values => { entry.args = values; }));
    }
  });
  page.on('pageerror', err => report.pageErrors.push(String(err?.stack || err).slice(0, 2000)));
  page.on('requestfailed', req => {
    const why = req.failure()?.errorText;
    // OHIF cancels prefetch/thumbnail requests it no longer needs; those are not failures.
    if (why !== 'net::ERR_ABORTED') report.failedRequests.push({ url: req.url(), why });
  });
  page.on('response', resp => {
    if (resp.status() >= 400) report.failedRequests.push({ url: resp.url(), why: `HTTP ${resp.status()}` });
  });
  // The onboarding tour would cover the viewer on a first visit.
  await page.evaluateOnNewDocument(() => localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour'])));

  await page.goto(`${args.url}/viewer?StudyInstanceUIDs=${encodeURIComponent(args.study)}`, { waitUntil: 'domcontentloaded' });
  step('page loaded');

  const segDisplaySetUID = await page.waitForFunction(seg => {
    const ds = window.services?.displaySetService?.getActiveDisplaySets?.() || [];
    return ds.find(d => d.SeriesInstanceUID === seg)?.displaySetInstanceUID;
  }, { polling: 200 }, args.segSeries).then(h => h.jsonValue());
  step('SEG display set present');

  // Record OHIF's user-facing notifications (a failed SEG load shows one).
  await page.evaluate(() => {
    const svc = window.services.uiNotificationService;
    window.__segappNotifications = [];
    const show = svc.show.bind(svc);
    svc.show = opts => {
      window.__segappNotifications.push({ type: opts?.type, title: String(opts?.title ?? ''), message: String(opts?.message ?? '') });
      return show(opts);
    };
  });

  // The source series must be on screen before the SEG goes in (what a user waits for too).
  await page.waitForFunction(() => {
    const s = window.services;
    const vp = s.viewportGridService.getState().viewports.get(s.viewportGridService.getActiveViewportId());
    const csvp = vp && s.cornerstoneViewportService.getCornerstoneViewport(vp.viewportId);
    return Boolean(csvp && csvp.getCurrentImageId && csvp.getCurrentImageId());
  }, { polling: 200 });
  step('source series displayed');

  const thumb = `[id="thumbnail-${segDisplaySetUID}"]`;
  await page.waitForSelector(thumb, { visible: true });
  await page.click(thumb, { count: 2 });
  step('SEG thumbnail double-clicked');

  // Hydrated, or OHIF gave up: an error notification, or the page died (checked by the timeout).
  const outcome = await page.waitForFunction(uid => {
    try {
      const failed = (window.__segappNotifications || []).find(n => n.type === 'error');
      if (failed) return { error: `${failed.title}: ${failed.message}` };
      const s = window.services;
      const seg = s.segmentationService.getSegmentation(uid);
      const lm = seg?.representationData?.Labelmap;
      const vpId = s.viewportGridService.getActiveViewportId();
      const reps = s.segmentationService.getSegmentationRepresentations(vpId, { segmentationId: uid }) || [];
      const ds = s.displaySetService.getDisplaySetByUID(uid);
      return ds?.isLoaded && lm && reps.length && (lm.imageIds?.length || lm.volumeId) ? { loaded: true } : false;
    } catch {
      return false;  // services mid-update; poll again
    }
  }, { polling: 250 }, segDisplaySetUID).then(h => h.jsonValue());
  if (outcome.error) throw new Error(`OHIF could not load the SEG: ${outcome.error}`);
  step('SEG hydrated as a labelmap');

  const dump = await page.evaluate(uid => {
    const cs = window.cornerstone;
    const s = window.services;
    const seg = s.segmentationService.getSegmentation(uid);
    const lm = seg.representationData.Labelmap;
    const toBase64 = arr => {
      const bytes = new Uint8Array(arr.buffer, arr.byteOffset, arr.byteLength);
      let bin = '';
      for (let i = 0; i < bytes.length; i += 0x8000) bin += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
      return btoa(bin);
    };
    const dtype = arr => ({ Uint8Array: 'u1', Int8Array: 'i1', Uint16Array: '<u2', Int16Array: '<i2',
                            Uint32Array: '<u4', Int32Array: '<i4', Float32Array: '<f4', Float64Array: '<f8' })[arr.constructor.name];
    const blob = arr => ({ dtype: dtype(arr), base64: toBase64(arr), length: arr.length });
    const layerDump = layer => {
      const out = { labelmapId: layer.labelmapId, labelToSegmentIndex: layer.labelToSegmentIndex || null };
      if (layer.volumeId) {
        const vol = cs.cache.getVolume(layer.volumeId);
        Object.assign(out, {
          kind: 'volume', volumeId: layer.volumeId, dimensions: Array.from(vol.dimensions),
          origin: Array.from(vol.origin), direction: Array.from(vol.direction), spacing: Array.from(vol.spacing),
          data: blob(vol.voxelManager.getCompleteScalarDataArray()),
        });
      } else {
        out.kind = 'stack';
        out.images = layer.imageIds.map(id => {
          const img = cs.cache.getImage(id);
          const plane = cs.metaData.get('imagePlaneModule', id) || {};
          const data = img.voxelManager ? img.voxelManager.getScalarData() : img.getPixelData();
          return {
            imageId: id, referencedImageId: img.referencedImageId ?? null, rows: img.rows, columns: img.columns,
            imagePositionPatient: plane.imagePositionPatient, rowCosines: plane.rowCosines,
            columnCosines: plane.columnCosines, rowPixelSpacing: plane.rowPixelSpacing,
            columnPixelSpacing: plane.columnPixelSpacing, frameOfReferenceUID: plane.frameOfReferenceUID ?? null,
            data: blob(data),
          };
        });
      }
      return out;
    };
    const layers = lm.labelmaps && Object.keys(lm.labelmaps).length
      ? Object.values(lm.labelmaps)
      : [{ labelmapId: 'legacy', volumeId: lm.volumeId, imageIds: lm.imageIds }];
    const vpId = s.viewportGridService.getActiveViewportId();
    return {
      segmentationId: seg.segmentationId,
      label: seg.label,
      segments: Object.fromEntries(Object.entries(seg.segments).map(([k, v]) => [k, { label: v.label, segmentIndex: v.segmentIndex }])),
      segmentBindings: lm.segmentBindings || null,
      layers: layers.map(layerDump),
      viewport: { id: vpId, type: s.cornerstoneViewportService.getCornerstoneViewport(vpId)?.type ?? null },
      notifications: window.__segappNotifications,
      ohifVersion: window.version ?? null,
    };
  }, segDisplaySetUID);
  await Promise.all(pending);
  report.labelmap = dump;
  report.notifications = dump.notifications;
  step('labelmap dumped');
  if (args.screenshot) await page.screenshot({ path: args.screenshot });
}

let code = 0;
try {
  await main();
  const errors = report.console.filter(m => m.type === 'error').map(m => m.text).concat(report.pageErrors)
    .concat(report.notifications.filter(n => n.type === 'error').map(n => `${n.title}: ${n.message}`));
  report.segErrors = errors.filter(t => SEG_ERROR.test(t));
  report.segWarnings = report.console.filter(m => m.type === 'warn' || m.type === 'warning').map(m => m.text)
    .concat(report.notifications.filter(n => n.type === 'warning').map(n => `${n.title}: ${n.message}`))
    .filter(t => SEG_ERROR.test(t));
  if (report.segErrors.length) code = 1;
} catch (err) {
  report.failure = String(err?.stack || err).slice(0, 4000) + (err?.cause ? `\ncause: ${err.cause}` : '');
  code = 2;
} finally {
  clearTimeout(hardTimer);
  write();
  try { await browser?.close(); } catch { /* exiting anyway */ }
}
if (report.failure) console.error(`check failed: ${report.failure.split('\n')[0]}`);
for (const e of report.segErrors || []) console.error(`SEG error: ${e.slice(0, 300)}`);
process.exit(code);
