/*
 * The upload and download page of ovirt-imageio (issue 15).
 *
 * It speaks the daemon's HTTP API (API.md) as WebAdmin does
 * (CLIENTS.md section 1), from the origin of the daemon or proxy that
 * serves it, or cross-origin to the daemon named in a transfer URL (CORS).
 *
 * Secrets: the ticket id is the only credential. It lives in the #url
 * field and in sessionStorage (so a reload of this tab keeps it); it is
 * taken from the URL fragment (#ticket=ID, never sent to a server) and
 * the fragment is then removed from the address bar and history. It is
 * never put in a query string, and server messages are shown with it
 * blanked. localStorage keeps only the completed byte ranges of an
 * upload, keyed by a SHA-256 of the ticket and the file's name, size and
 * modification time, so an upload resumes after a reload.
 *
 * Upload: the file is cut in chunks; each is read, and sent as PATCH zero
 * when all zero, else as PUT with Content-Range and flush=n (the last
 * chunk without it); a few chunks are in flight at once (at most the
 * ticket's max_writers); a failed chunk is retried with backoff; at the
 * end PATCH flush. Pause lets the chunks in flight finish; cancel aborts
 * them.
 *
 * Verify: the blkhash construction of API.md 1.6 with SHA-256 (Web
 * Crypto has no blake2b) and the server's default 4 MiB blocks, computed
 * over the file and compared with GET /images/ID/checksum.
 *
 * No dependencies, no build step, no inline script (the page's CSP).
 */
"use strict";

(function () {

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;

// The checksum both sides can compute: Web Crypto's SHA-256 is Python's
// hashlib "sha256".
const CHECKSUM_ALGORITHM = "sha256";
const WEBCRYPTO_ALGORITHM = "SHA-256";
const CHECKSUM_BLOCK_SIZE = 4 * MiB;

// Retries of a failed chunk: RETRIES more attempts, the first after
// BACKOFF ms, doubling up to MAX_BACKOFF (then the upload stops with an
// error and Resume tries again).
const RETRIES = 5;
const BACKOFF = 500;
const MAX_BACKOFF = 8000;

const STORE_PREFIX = "imageio.upload.";
const SESSION_URL = "imageio.url";

// Format sniffing (as WebAdmin): qcow2 magic at 0, ISO 9660 "CD001" at
// 0x8001, anything else raw.
const QCOW2_MAGIC = [0x51, 0x46, 0x49, 0xfb];
const ISO_OFFSET = 0x8001;
const ISO_MAGIC = "CD001";
const SNIFF_SIZE = ISO_OFFSET + ISO_MAGIC.length;

// Pure helpers, exported on window.imageioPage for tests.

function formatBytes(n) {
  if (n >= GiB) return (n / GiB).toFixed(2) + " GiB";
  if (n >= MiB) return (n / MiB).toFixed(1) + " MiB";
  if (n >= KiB) return (n / KiB).toFixed(1) + " KiB";
  return n + " bytes";
}

function formatSeconds(s) {
  if (!isFinite(s)) return "unknown";
  s = Math.ceil(s);
  if (s < 60) return s + " s";
  const m = Math.floor(s / 60);
  if (m < 60) return m + " min " + (s % 60) + " s";
  return Math.floor(m / 60) + " h " + (m % 60) + " min";
}

/*
 * Parse the #url field: a transfer URL https://HOST:PORT/images/TICKET,
 * or a ticket id for this page's own origin. Returns {origin, ticket,
 * imageUrl} or throws Error with a message for the user.
 */
function parseTransfer(text, ownOrigin) {
  text = text.trim();
  if (!text) throw new Error("enter a transfer URL or ticket id");
  let origin = ownOrigin;
  let ticket = text;
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(text)) {
    let u;
    try {
      u = new URL(text);
    } catch (e) {
      throw new Error("not a valid URL");
    }
    if (u.protocol !== "https:" && u.protocol !== "http:") {
      throw new Error("a transfer URL starts with https://");
    }
    const m = /^\/images\/([^/]+)$/.exec(u.pathname);
    if (!m) throw new Error("a transfer URL ends with /images/TICKET");
    origin = u.origin;
    ticket = decodeURIComponent(m[1]);
  } else if (/[\/\s?#]/.test(text)) {
    throw new Error("a ticket id has no '/', '?', '#' or spaces");
  }
  return {
    origin: origin,
    ticket: ticket,
    imageUrl: origin + "/images/" + encodeURIComponent(ticket),
  };
}

/*
 * Sniff a disk image's format and virtual size from its first bytes
 * (at least SNIFF_SIZE of them when the file has them).
 */
function sniff(bytes, fileSize) {
  const b = new Uint8Array(bytes);
  if (b.length >= 32 && QCOW2_MAGIC.every((v, i) => b[i] === v)) {
    const view = new DataView(b.buffer, b.byteOffset, b.byteLength);
    const size = view.getBigUint64(24, false);
    return {format: "qcow2", virtualSize: Number(size)};
  }
  if (b.length >= SNIFF_SIZE) {
    const magic = String.fromCharCode(...b.subarray(ISO_OFFSET, SNIFF_SIZE));
    if (magic === ISO_MAGIC) return {format: "iso", virtualSize: fileSize};
  }
  return {format: "raw", virtualSize: fileSize};
}

function isZero(buffer) {
  const n = buffer.byteLength;
  const words = new Uint32Array(buffer, 0, n >>> 2);
  for (let i = 0; i < words.length; i++) {
    if (words[i] !== 0) return false;
  }
  const tail = new Uint8Array(buffer, n & ~3);
  for (let i = 0; i < tail.length; i++) {
    if (tail[i] !== 0) return false;
  }
  return true;
}

// Byte ranges: sorted, merged [start, end) pairs.

function addRange(ranges, start, end) {
  const out = [];
  let placed = false;
  for (const [s, e] of ranges) {
    if (e < start) {
      out.push([s, e]);
    } else if (end < s) {
      if (!placed) {
        out.push([start, end]);
        placed = true;
      }
      out.push([s, e]);
    } else {
      start = Math.min(start, s);
      end = Math.max(end, e);
    }
  }
  if (!placed) out.push([start, end]);
  return out;
}

function rangesTotal(ranges) {
  return ranges.reduce((sum, [s, e]) => sum + e - s, 0);
}

// The chunks [offset, length] of [0, size) not covered by ranges.
function missingChunks(ranges, size, chunkSize) {
  const chunks = [];
  let pos = 0;
  const gaps = [];
  for (const [s, e] of ranges) {
    if (s > pos) gaps.push([pos, Math.min(s, size)]);
    pos = Math.max(pos, e);
  }
  if (pos < size) gaps.push([pos, size]);
  for (const [s, e] of gaps) {
    for (let o = s; o < e; o += chunkSize) {
      chunks.push([o, Math.min(chunkSize, e - o)]);
    }
  }
  return chunks;
}

function hex(buffer) {
  return Array.from(new Uint8Array(buffer),
                    (b) => b.toString(16).padStart(2, "0")).join("");
}

async function sha256Hex(text) {
  const data = new TextEncoder().encode(text);
  return hex(await crypto.subtle.digest("SHA-256", data));
}

/*
 * The blkhash checksum (API.md 1.6, ovirt_imageio/checksum.py) of the
 * first size bytes of blob, zero-padded when blob is shorter (a disk
 * larger than the file reads zeros past it): the digest of the
 * concatenated digests of each blockSize block. An all-zero block's
 * digest depends only on its length, so it is computed once.
 * progress(bytes) is called after each block; signal aborts.
 */
async function blkhash(blob, size, blockSize, algorithm, progress, signal) {
  algorithm = algorithm || WEBCRYPTO_ALGORITHM;
  const zeroDigests = new Map();
  async function zeroDigest(length) {
    if (!zeroDigests.has(length)) {
      zeroDigests.set(length, await crypto.subtle.digest(
        algorithm, new ArrayBuffer(length)));
    }
    return zeroDigests.get(length);
  }
  async function blockDigest(offset) {
    const length = Math.min(blockSize, size - offset);
    let data = null;
    if (offset < blob.size) {
      data = await blob.slice(offset, offset + length).arrayBuffer();
      if (data.byteLength < length) {
        const padded = new Uint8Array(length);
        padded.set(new Uint8Array(data));
        data = padded.buffer;
      }
    }
    const digest = (data === null || isZero(data))
      ? await zeroDigest(length)
      : await crypto.subtle.digest(algorithm, data);
    return [digest, length];
  }
  const digests = [];
  // A few blocks at a time: reading and hashing overlap.
  const WINDOW = 4;
  for (let o = 0; o < size; o += blockSize * WINDOW) {
    if (signal && signal.aborted) throw new DOMException("aborted", "AbortError");
    const batch = [];
    for (let i = 0; i < WINDOW && o + i * blockSize < size; i++) {
      batch.push(blockDigest(o + i * blockSize));
    }
    for (const [digest, length] of await Promise.all(batch)) {
      digests.push(new Uint8Array(digest));
      if (progress) progress(length);
    }
  }
  const all = new Uint8Array(digests.reduce((n, d) => n + d.length, 0));
  let pos = 0;
  for (const d of digests) {
    all.set(d, pos);
    pos += d.length;
  }
  return hex(await crypto.subtle.digest(algorithm, all));
}

window.imageioPage = {
  parseTransfer, sniff, isZero, addRange, rangesTotal, missingChunks,
  blkhash, formatBytes, dispositionName,
};

// The page.

const $ = (id) => document.getElementById(id);

const ui = {
  url: $("url"), file: $("file"), test: $("test"), start: $("start"),
  pause: $("pause"), resume: $("resume"), cancel: $("cancel"),
  verify: $("verify"), download: $("download"), progress: $("progress"),
  progressText: $("progress-text"), status: $("status"),
  connection: $("connection"), format: $("format"), warning: $("warning"),
  chunk: $("chunk"), inflight: $("inflight"), log: $("log"),
};

// What the page knows; one upload or verify at a time.
const state = {
  transfer: null,   // parseTransfer() result, or null
  info: null,       // {size, maxWriters, features} of the transfer
  sniffed: null,    // sniff() result of the chosen file
  record: null,     // {key, ranges} of the chosen file's upload
  job: null,        // the running Upload or Verify
  ownInfo: null,    // this page's own /info/
};

function setStatus(text) {
  ui.status.textContent = text;
}

function redact(text) {
  const t = state.transfer && state.transfer.ticket;
  if (t) text = text.split(t).join("…");
  return text;
}

function log(text) {
  const li = document.createElement("li");
  li.textContent = new Date().toLocaleTimeString() + " " + redact(text);
  ui.log.appendChild(li);
  while (ui.log.children.length > 200) ui.log.firstChild.remove();
  li.scrollIntoView({block: "nearest"});
}

function fail(message) {
  message = redact(message);
  setStatus("error: " + message);
  log("error: " + message);
}

function updateButtons() {
  const job = state.job;
  const uploading = job instanceof Upload;
  const running = job && job.running;
  const ready = state.transfer && ui.file.files.length > 0;
  ui.start.disabled = !ready || !!running || (uploading && job.resumable);
  ui.pause.disabled = !(uploading && running && !job.pausing);
  ui.resume.disabled = !(uploading && !running && job.resumable);
  ui.cancel.disabled = !(job && (running || job.resumable));
  ui.verify.disabled = !ready || !!running;
  ui.test.disabled = !!running;
  ui.url.disabled = !!(job && (running || job.resumable));
  ui.file.disabled = ui.url.disabled;
  if (state.transfer) {
    ui.download.href = state.transfer.imageUrl;
    ui.download.removeAttribute("aria-disabled");
  } else {
    ui.download.removeAttribute("href");
    ui.download.setAttribute("aria-disabled", "true");
  }
}

function showProgress(done, total, rate) {
  ui.progress.max = Math.max(total, 1);
  ui.progress.value = done;
  const pct = total ? Math.floor(done * 100 / total) : 0;
  let text = `${formatBytes(done)} of ${formatBytes(total)} (${pct}%)`;
  // rate: bytes/s; null while no chunk of this run completed yet;
  // undefined when nothing runs.
  if (rate === null) {
    text += ", measuring rate";
  } else if (rate !== undefined) {
    text += `, ${formatBytes(rate)}/s`;
    text += ", time left " + formatSeconds(rate > 0 ? (total - done) / rate : Infinity);
  }
  ui.progressText.textContent = text;
}

async function errorText(resp) {
  let body = "";
  try {
    body = (await resp.text()).trim().slice(0, 300);
  } catch (e) {
    // The body is only for the message.
  }
  return `${resp.status} ${resp.statusText}${body ? ": " + body : ""}`;
}

// A network failure (TypeError) says nothing more in a browser: TLS,
// DNS, refused and CORS failures all look alike to the page.
function networkError(e) {
  return e instanceof TypeError;
}

// WebAdmin's words when the test connection fails.
function connectionFailedMessage(origin) {
  return `Connection to ovirt-imageio service has failed (${origin}). ` +
    "Ensure that the service is running, and that the certificate " +
    "authority (CA) of its certificate is registered as a valid CA " +
    "in the browser.";
}

function showCaLink() {
  const ca = state.ownInfo && state.ownInfo.ca_url;
  if (!ca) return;
  const a = document.createElement("a");
  a.id = "ca-link";
  a.href = new URL(ca, location.origin).href;
  a.textContent = "Download the CA certificate";
  a.setAttribute("download", "ca.pem");
  ui.connection.append(" ", a, " and import it as a trusted authority, then reload.");
}

async function testConnection() {
  if (!readTransfer()) return;
  const origin = state.transfer.origin;
  ui.connection.textContent = "";
  let resp;
  try {
    resp = await fetch(origin + "/info/", {cache: "no-store"});
  } catch (e) {
    if (!networkError(e)) throw e;
    ui.connection.textContent = connectionFailedMessage(origin);
    showCaLink();
    fail("connection to ovirt-imageio service has failed");
    return;
  }
  if (!resp.ok) {
    ui.connection.textContent = `${origin}/info/ answered ${resp.status}.`;
    fail(`test connection: ${await errorText(resp)}`);
    return;
  }
  const info = await resp.json();
  ui.connection.textContent = `Connected to ovirt-imageio ${info.version} at ${origin}.`;
  log(`connected to ${origin} (version ${info.version})`);
  setStatus("connected");
}

// The transfer from the #url field; false after showing why not.
function readTransfer() {
  try {
    state.transfer = parseTransfer(ui.url.value, location.origin);
  } catch (e) {
    state.transfer = null;
    updateButtons();
    fail(e.message);
    return false;
  }
  updateButtons();
  return true;
}

function urlChanged() {
  state.info = null;
  sessionStorage.setItem(SESSION_URL, ui.url.value);
  if (ui.url.value.trim()) {
    if (!readTransfer()) return;
    nameDownload().catch(() => {});
  } else {
    state.transfer = null;
    updateButtons();
  }
  fileChanged();
}

/*
 * The transfer's size, features and max_writers: OPTIONS for the
 * features, /extents for the size (the end of the last extent, as
 * ovirt_imageio.client learns it). Throws Error for the user.
 */
async function transferInfo() {
  if (state.info) return state.info;
  const url = state.transfer.imageUrl;
  let resp;
  try {
    resp = await fetch(url, {method: "OPTIONS", cache: "no-store"});
  } catch (e) {
    if (networkError(e)) throw new Error(connectionFailedMessage(state.transfer.origin));
    throw e;
  }
  if (!resp.ok) throw new Error(await errorText(resp));
  const options = await resp.json();
  let size = null;
  try {
    resp = await fetch(url + "/extents", {cache: "no-store"});
    if (resp.ok) {
      const extents = await resp.json();
      const last = extents[extents.length - 1];
      size = last ? last.start + last.length : 0;
    }
  } catch (e) {
    if (!networkError(e)) throw e;
    // An older daemon without CORS on /extents: size unknown.
  }
  state.info = {
    size: size,
    features: new Set(options.features || []),
    maxWriters: options.max_writers || 1,
  };
  return state.info;
}

// The file name of Content-Disposition (filename*, else filename).
function dispositionName(header) {
  if (!header) return null;
  let m = /filename\*=UTF-8''([^;]+)/i.exec(header);
  if (m) {
    try {
      return decodeURIComponent(m[1].trim());
    } catch (e) {
      // Malformed: try the plain parameter.
    }
  }
  m = /filename="([^"]*)"/i.exec(header) || /filename=([^;]+)/i.exec(header);
  return m ? m[1].trim() : null;
}

/*
 * Name the download link after the ticket's file name: HEAD reads no
 * data (the ticket's transferred bytes stay as they are), and carries
 * the Content-Disposition a download gets.
 */
async function nameDownload() {
  const transfer = state.transfer;
  ui.download.textContent = "Download the disk";
  if (!transfer) return;
  let resp;
  try {
    resp = await fetch(transfer.imageUrl, {method: "HEAD", cache: "no-store"});
  } catch (e) {
    if (networkError(e)) return;
    throw e;
  }
  const name = resp.ok && dispositionName(resp.headers.get("content-disposition"));
  if (name && state.transfer === transfer) {
    ui.download.textContent = "Download " + name;
  }
}

function fileRecordKey(ticketHash, file) {
  return STORE_PREFIX + ticketHash + "." + encodeURIComponent(file.name) +
    "." + file.size + "." + file.lastModified;
}

// The completed ranges of an earlier upload of file to transfer.
async function loadRecord(transfer, file) {
  const key = fileRecordKey(await sha256Hex(transfer.ticket), file);
  const saved = JSON.parse(localStorage.getItem(key) || "null");
  return {key: key, ranges: saved ? saved.ranges : []};
}

async function fileChanged() {
  ui.format.textContent = "";
  ui.warning.textContent = "";
  state.sniffed = null;
  state.record = null;
  state.job = null;
  const file = ui.file.files[0];
  if (!file) {
    updateButtons();
    return;
  }
  const head = await file.slice(0, SNIFF_SIZE).arrayBuffer();
  const sniffed = sniff(head, file.size);
  state.sniffed = sniffed;
  let text = `${file.name}: format ${sniffed.format}, virtual size ` +
    `${formatBytes(sniffed.virtualSize)}, file size ${formatBytes(file.size)}`;
  ui.format.textContent = text + ".";
  if (!state.transfer) {
    updateButtons();
    return;
  }
  const transfer = state.transfer;
  state.record = await loadRecord(transfer, file);
  const done = rangesTotal(state.record.ranges);
  showProgress(done, file.size);
  if (done) {
    log(`${formatBytes(done)} of this file were uploaded before; Start resumes`);
  }
  try {
    const info = await transferInfo();
    if (state.transfer !== transfer) return;
    if (info.size !== null) {
      ui.format.textContent = text + `; the transfer's disk is ${formatBytes(info.size)}.`;
      if (file.size > info.size) {
        ui.warning.textContent = `The file (${formatBytes(file.size)}) is ` +
          `larger than the transfer's disk (${formatBytes(info.size)}); ` +
          "it does not fit.";
      } else if (sniffed.format === "raw" && file.size < info.size) {
        ui.warning.textContent = `The file (${formatBytes(file.size)}) is ` +
          `smaller than the transfer's disk (${formatBytes(info.size)}); ` +
          "the rest of the disk is left as it is.";
      }
    }
  } catch (e) {
    log("cannot learn the transfer's size: " + e.message);
  }
  updateButtons();
}

// Sleep ms, or less when wake() is called (pause, cancel).
function napper() {
  let wakers = [];
  return {
    sleep(ms) {
      return new Promise((resolve) => {
        const t = setTimeout(done, ms);
        function done() {
          clearTimeout(t);
          wakers = wakers.filter((w) => w !== done);
          resolve();
        }
        wakers.push(done);
      });
    },
    wake() {
      for (const w of wakers.slice()) w();
    },
  };
}

class RetryableError extends Error {}

class Upload {
  constructor(file, transfer, record) {
    this.file = file;
    this.transfer = transfer;
    this.record = record;
    this.running = false;
    this.pausing = false;
    this.canceled = false;
    this.resumable = false;
    this.nap = napper();
    this.abort = null;
    // For the rate: bytes this page sent and the time it spent running
    // (pauses excluded), over all runs of this upload.
    this.sentBytes = 0;
    this.activeMs = 0;
  }

  get done() {
    return rangesTotal(this.record.ranges);
  }

  async run() {
    const info = await transferInfo();
    if (info.size !== null && this.file.size > info.size) {
      throw new Error(`the file is larger than the transfer's disk ` +
                      `(${this.file.size} > ${info.size} bytes)`);
    }
    const chunkSize = Math.max(1, Math.min(128, Number(ui.chunk.value) || 8)) * MiB;
    const inflight = Math.max(1, Math.min(8, Number(ui.inflight.value) || 4,
                                          info.maxWriters));
    this.canZero = info.features.has("zero");
    this.canFlush = info.features.has("flush");
    this.queue = missingChunks(this.record.ranges, this.file.size, chunkSize);
    this.running = true;
    this.pausing = false;
    this.resumable = false;
    this.error = null;
    this.abort = new AbortController();
    this.runStart = performance.now();
    setStatus("uploading");
    this.progress();
    log(`uploading ${this.queue.length} chunks of up to ${formatBytes(chunkSize)}, ` +
        `${inflight} in flight`);
    updateButtons();
    const workers = [];
    for (let i = 0; i < inflight; i++) workers.push(this.worker());
    await Promise.all(workers);
    this.activeMs += performance.now() - this.runStart;
    this.running = false;
    if (this.canceled) return;
    if (this.error) {
      this.resumable = true;
      fail(this.error.message);
    } else if (this.queue.length) {
      this.resumable = true;
      setStatus("paused");
      log(`paused at ${formatBytes(this.done)}`);
    } else {
      await this.finish();
    }
    updateButtons();
  }

  async worker() {
    while (this.queue.length && !this.pausing && !this.canceled && !this.error) {
      const chunk = this.queue.shift();
      try {
        await this.send(chunk);
      } catch (e) {
        if (this.canceled) return;
        if (e instanceof PauseRequested) {
          this.queue.unshift(chunk);
          return;
        }
        this.queue.unshift(chunk);
        this.error = this.error || e;
        this.nap.wake();
        return;
      }
      this.record.ranges = addRange(this.record.ranges, chunk[0], chunk[0] + chunk[1]);
      this.save();
      this.sentBytes += chunk[1];
      this.progress();
    }
  }

  // One chunk, with retries. Throws PauseRequested when paused during a
  // backoff, Error when it cannot be sent.
  async send([offset, length]) {
    const data = await this.file.slice(offset, offset + length).arrayBuffer();
    const zero = this.canZero && isZero(data);
    for (let attempt = 0; ; attempt++) {
      try {
        await (zero ? this.zero(offset, length) : this.put(offset, length, data));
        return;
      } catch (e) {
        if (this.canceled || !(e instanceof RetryableError) || attempt >= RETRIES) {
          throw new Error(`chunk at ${offset}: ${e.message}`);
        }
        const delay = Math.min(BACKOFF * 2 ** attempt, MAX_BACKOFF);
        log(`chunk at ${offset} failed (${e.message}); retry ${attempt + 1} ` +
            `of ${RETRIES} in ${delay / 1000} s`);
        await this.nap.sleep(delay);
        if (this.canceled) throw new Error("canceled");
        if (this.pausing || this.error) throw new PauseRequested();
      }
    }
  }

  async request(url, init) {
    let resp;
    try {
      resp = await fetch(url, Object.assign({signal: this.abort.signal, cache: "no-store"}, init));
    } catch (e) {
      if (networkError(e)) throw new RetryableError("network error");
      throw e;
    }
    if (resp.ok) {
      await resp.arrayBuffer();
      return;
    }
    const text = await errorText(resp);
    // Server errors and overload are worth retrying; a refused ticket
    // or range is not.
    if (resp.status >= 500 || resp.status === 408 || resp.status === 429) {
      throw new RetryableError(text);
    }
    throw new Error(text);
  }

  put(offset, length, data) {
    const last = offset + length === this.file.size;
    const query = (!last && this.canFlush) ? "?flush=n" : "";
    return this.request(this.transfer.imageUrl + query, {
      method: "PUT",
      headers: {
        "Content-Type": "application/octet-stream",
        "Content-Range": `bytes ${offset}-${offset + length - 1}/${this.file.size}`,
      },
      body: data,
    });
  }

  zero(offset, length) {
    return this.patch({op: "zero", offset: offset, size: length, flush: false});
  }

  patch(message) {
    return this.request(this.transfer.imageUrl, {
      method: "PATCH",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify(message),
    });
  }

  async finish() {
    if (this.canFlush) {
      for (let attempt = 0; ; attempt++) {
        try {
          await this.patch({op: "flush"});
          break;
        } catch (e) {
          if (!(e instanceof RetryableError) || attempt >= RETRIES) {
            this.resumable = true;
            fail(`flush: ${e.message}`);
            return;
          }
          await this.nap.sleep(Math.min(BACKOFF * 2 ** attempt, MAX_BACKOFF));
        }
      }
    }
    localStorage.removeItem(this.record.key);
    this.progress();
    this.finished = true;
    setStatus("done");
    log(`upload done: ${formatBytes(this.file.size)}`);
  }

  save() {
    localStorage.setItem(this.record.key, JSON.stringify({
      name: this.file.name, size: this.file.size,
      mtime: this.file.lastModified, ranges: this.record.ranges,
      updated: Date.now(),
    }));
  }

  progress() {
    const seconds = (this.activeMs + performance.now() - this.runStart) / 1000;
    let rate;
    if (this.running) {
      rate = (this.sentBytes && seconds > 0) ? this.sentBytes / seconds : null;
    }
    showProgress(this.done, this.file.size, rate);
  }

  pause() {
    if (!this.running) return;
    this.pausing = true;
    this.nap.wake();
    log("pausing: waiting for the chunks in flight");
    updateButtons();
  }

  cancel() {
    this.canceled = true;
    this.running = false;
    this.resumable = false;
    this.nap.wake();
    if (this.abort) this.abort.abort();
    localStorage.removeItem(this.record.key);
    this.record.ranges = [];
    setStatus("canceled");
    log("upload canceled");
    updateButtons();
  }
}

class PauseRequested extends Error {}

async function startUpload() {
  if (!readTransfer()) return;
  if (!state.record) await fileChanged();
  const file = ui.file.files[0];
  // Afresh: a finished upload left no record, so Start sends it all again.
  state.record = await loadRecord(state.transfer, file);
  const job = new Upload(file, state.transfer, state.record);
  state.job = job;
  await runUpload(job);
}

async function runUpload(job) {
  try {
    await job.run();
  } catch (e) {
    job.running = false;
    job.resumable = !job.canceled;
    if (!job.canceled) fail(e.message);
  }
  updateButtons();
}

async function verify() {
  if (!readTransfer()) return;
  const file = ui.file.files[0];
  const transfer = state.transfer;
  const job = {running: true, abort: new AbortController()};
  const previous = state.job;
  state.job = job;
  updateButtons();
  setStatus("verifying");
  try {
    const info = await transferInfo();
    const size = info.size !== null ? info.size : file.size;
    const url = transfer.imageUrl +
      `/checksum?algorithm=${CHECKSUM_ALGORITHM}&block_size=${CHECKSUM_BLOCK_SIZE}`;
    // The server's checksum reads the disk while ours reads the file.
    const remote = fetch(url, {cache: "no-store", signal: job.abort.signal}).then(async (resp) => {
      if (!resp.ok) throw new Error("checksum: " + await errorText(resp));
      return resp.json();
    });
    remote.catch(() => {});
    let hashed = 0;
    const local = await blkhash(file, size, CHECKSUM_BLOCK_SIZE, WEBCRYPTO_ALGORITHM,
                                (n) => {
                                  hashed += n;
                                  showProgress(hashed, size);
                                }, job.abort.signal);
    const theirs = (await remote).checksum;
    if (local === theirs) {
      log(`verified: ${CHECKSUM_ALGORITHM} checksum ${local}`);
      setStatus("verified");
    } else {
      log(`file checksum ${local}, disk checksum ${theirs}`);
      fail("checksum mismatch: the disk differs from the file");
    }
  } catch (e) {
    if (job.abort.signal.aborted) {
      setStatus("canceled");
      log("verify canceled");
    } else {
      fail(networkError(e) ? connectionFailedMessage(transfer.origin) : e.message);
    }
  } finally {
    job.running = false;
    // Verifying after an upload keeps its state (nothing to resume).
    state.job = previous && previous.resumable ? previous : null;
    updateButtons();
  }
}

// The ticket from the fragment (#ticket=ID or #url=URL), else the one
// this tab had; the fragment leaves the address bar and history.
function initialUrl() {
  const params = new URLSearchParams(location.hash.slice(1));
  const value = params.get("ticket") || params.get("url");
  if (value) {
    history.replaceState(null, "", location.pathname);
    sessionStorage.setItem(SESSION_URL, value);
    return value;
  }
  return sessionStorage.getItem(SESSION_URL) || "";
}

async function loadOwnInfo() {
  try {
    const resp = await fetch("/info/", {cache: "no-store"});
    if (resp.ok) state.ownInfo = await resp.json();
  } catch (e) {
    // Only for the CA link.
  }
}

function guard(fn) {
  return () => fn().catch((e) => fail(e.message || String(e)));
}

ui.url.addEventListener("change", guard(async () => urlChanged()));
ui.file.addEventListener("change", guard(fileChanged));
ui.test.addEventListener("click", guard(testConnection));
ui.start.addEventListener("click", guard(startUpload));
ui.pause.addEventListener("click", () => state.job && state.job.pause());
ui.resume.addEventListener("click", guard(async () => {
  if (state.job instanceof Upload) await runUpload(state.job);
}));
ui.cancel.addEventListener("click", () => {
  if (state.job instanceof Upload) state.job.cancel();
  else if (state.job && state.job.abort) state.job.abort.abort();
});
ui.verify.addEventListener("click", guard(verify));
ui.download.addEventListener("click", (e) => {
  if (!state.transfer) e.preventDefault();
});

ui.url.value = initialUrl();
if (ui.url.value) {
  try {
    state.transfer = parseTransfer(ui.url.value, location.origin);
  } catch (e) {
    fail(e.message);
  }
}
setStatus("idle");
updateButtons();
loadOwnInfo();
if (state.transfer) nameDownload().catch(() => {});

})();
