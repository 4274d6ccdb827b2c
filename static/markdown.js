// A small markdown renderer for model output that builds DOM nodes and never parses HTML.
//
// Safety by construction: every piece of model text reaches the page through
// document.createTextNode or textContent; elements come from a fixed list of tag names;
// the only attribute taken from the text is a link's href, and only for http(s) URLs.
// So `<img onerror=...>`, `javascript:` links and the like show up as plain text.
//
// Subset: fenced code blocks (``` or ~~~, an unclosed fence while streaming included),
// headings, paragraphs, bullet and numbered lists (nested by indentation), block quotes,
// rules, tables; inline code, bold, italic, strikethrough, [links](https://...) and bare
// http(s) URLs. Why our own and not a library: CLAUDE.md D38.

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}> ?/;
const ITEM = /^( *)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const TABLE_SEPARATOR = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

// Spans are bounded (and emphasis stays on one line) so an unclosed `*` or `_` costs a
// short scan, not one to the end of the text: streamed text is re-rendered every frame.
const INLINE = new RegExp([
  /(`+)([^`]|[^`][\s\S]{0,2000}?[^`])\1(?!`)/.source,          // 1, 2: code span
  /\[([^\]\n]{1,500})\]\(\s*(https?:\/\/[^\s)]{1,2000})\s*\)/.source,  // 3, 4: link
  /(https?:\/\/[^\s<>()]{0,2000}[^\s<>().,;:!?'"*_~])/.source,  // 5: bare URL
  /\*\*(?=\S)([^\n]{0,400}?\S)\*\*/.source,                      // 6: bold
  /__(?=\S)([^\n]{0,400}?\S)__(?!\w)/.source,                    // 7: bold
  /~~(?=\S)([^\n]{0,400}?\S)~~/.source,                          // 8: strikethrough
  /\*(?=[^\s*])([^\n]{0,400}?[^\s*])\*(?!\*)/.source,            // 9: italic
  /(?<![\w])_(?=[^\s_])([^\n]{0,400}?[^\s_])_(?![\w])/.source,   // 10: italic
].join("|"), "g");

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

export function safeHref(url) {
  try {
    const parsed = new URL(url);
    return parsed.protocol === "http:" || parsed.protocol === "https:" ? parsed.href : null;
  } catch {
    return null;
  }
}

function link(href, children) {
  const a = el("a");
  a.href = href;
  a.target = "_blank";
  a.rel = "noopener noreferrer nofollow";
  a.append(...children);
  return a;
}

// Inline markup of one paragraph; `links` is false inside a link's own text.
export function renderInline(text, links = true) {
  const out = [];
  let last = 0;
  for (const m of text.matchAll(INLINE)) {  // matchAll copies the regex: safe to recurse
    const href = m[4] ? safeHref(m[4]) : m[5] ? safeHref(m[5]) : null;
    if (((m[3] || m[5]) && (!links || !href))) continue;  // a URL inside link text stays text
    if (m.index > last) out.push(...lines(text.slice(last, m.index)));
    if (m[2] !== undefined) out.push(el("code", null, m[2].replace(/^ (.*) $/s, "$1")));
    else if (m[3] !== undefined) out.push(link(href, renderInline(m[3], false)));
    else if (m[5] !== undefined) out.push(link(href, [document.createTextNode(m[5])]));
    else if (m[6] !== undefined || m[7] !== undefined) out.push(wrap("strong", m[6] ?? m[7], links));
    else if (m[8] !== undefined) out.push(wrap("del", m[8], links));
    else out.push(wrap("em", m[9] ?? m[10], links));
    last = m.index + m[0].length;
  }
  if (last < text.length) out.push(...lines(text.slice(last)));
  return out;
}

function wrap(tag, inner, links) {
  const node = el(tag);
  node.append(...renderInline(inner, links));
  return node;
}

// Text with its line breaks kept: chat answers use single newlines on purpose.
function lines(text) {
  const out = [];
  text.split("\n").forEach((line, i) => {
    if (i > 0) out.push(el("br"));
    if (line) out.push(document.createTextNode(line));
  });
  return out;
}

function codeBlock(lang, code) {
  const figure = el("figure", "code");
  const bar = el("figcaption", "code-bar");
  bar.append(el("span", "code-lang", lang || "text"));
  const copy = el("button", "code-copy", "Copy");
  copy.type = "button";
  copy.dataset.copy = "";
  bar.append(copy);
  const pre = el("pre");
  const codeEl = el("code", null, code);
  if (/^[\w+#.-]{1,32}$/.test(lang)) codeEl.dataset.lang = lang;
  pre.append(codeEl);
  figure.append(bar, pre);
  return figure;
}

function splitRow(line) {
  const cells = line.trim().replace(/^\|/, "").replace(/\|$/, "").split(/(?<!\\)\|/);
  return cells.map((cell) => cell.trim().replace(/\\\|/g, "|"));
}

function table(header, separator, rows) {
  const align = splitRow(separator).map((s) => (s.endsWith(":") ? (s.startsWith(":") ? "center" : "right") : ""));
  const wrapper = el("div", "table-wrap");
  const t = el("table");
  const head = el("thead");
  const headRow = el("tr");
  splitRow(header).forEach((cell, i) => headRow.append(cellNode("th", cell, align[i])));
  head.append(headRow);
  const body = el("tbody");
  for (const row of rows) {
    const tr = el("tr");
    splitRow(row).forEach((cell, i) => tr.append(cellNode("td", cell, align[i])));
    body.append(tr);
  }
  t.append(head, body);
  wrapper.append(t);
  return wrapper;
}

function cellNode(tag, text, align) {
  const node = el(tag);
  if (align) node.className = `align-${align}`;
  node.append(...renderInline(text));
  return node;
}

function startsBlock(line, next) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line)
    || (line.includes("|") && next !== undefined && TABLE_SEPARATOR.test(next) && next.includes("-"));
}

// Consecutive list items at one indentation, each with the indented lines under it.
function list(lines, i) {
  const first = lines[i].match(ITEM);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const node = el(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
  while (i < lines.length) {
    const m = lines[i].match(ITEM);
    if (!m || m[1].length !== indent || /\d/.test(m[2]) !== ordered) break;
    const body = [m[3]];
    i++;
    while (i < lines.length) {
      const line = lines[i];
      const deeper = line.match(/^( *)/)[1].length > indent;
      if (line.trim() === "" ? !(lines[i + 1] || "").startsWith(" ".repeat(indent + 1)) : !deeper) break;
      body.push(line.slice(Math.min(indent + 2, line.match(/^( *)/)[1].length)));
      i++;
    }
    const item = el("li");
    const nested = body.length > 1;
    item.append(...(nested ? renderBlocks(body.join("\n"), true) : renderInline(m[3])));
    node.append(item);
  }
  return [node, i];
}

export function renderBlocks(text, tight = false) {
  const lines = text.replace(/\r\n?/g, "\n").split("\n");
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (line.trim() === "") { i++; continue; }
    let m;
    if ((m = line.match(FENCE))) {
      const fence = m[1];
      const code = [];
      for (i++; i < lines.length && !lines[i].trimStart().startsWith(fence); i++) code.push(lines[i]);
      i++;
      out.push(codeBlock(m[2], code.join("\n")));
    } else if ((m = line.match(HEADING))) {
      const h = el(`h${Math.min(m[1].length + 2, 6)}`);
      h.append(...renderInline(m[2]));
      out.push(h);
      i++;
    } else if (RULE.test(line)) {
      out.push(el("hr"));
      i++;
    } else if (QUOTE.test(line)) {
      const quoted = [];
      for (; i < lines.length && QUOTE.test(lines[i]); i++) quoted.push(lines[i].replace(QUOTE, ""));
      const q = el("blockquote");
      q.append(...renderBlocks(quoted.join("\n")));
      out.push(q);
    } else if (ITEM.test(line)) {
      const [node, next] = list(lines, i);
      out.push(node);
      i = next;
    } else if (startsBlock(line, lines[i + 1])) {  // a table: header, separator, rows
      const rows = [];
      for (i += 2; i < lines.length && lines[i].includes("|") && lines[i].trim(); i++) rows.push(lines[i]);
      out.push(table(line, lines[i - rows.length - 1], rows));
    } else {
      const para = [line];
      for (i++; i < lines.length && lines[i].trim() !== "" && !startsBlock(lines[i], lines[i + 1]); i++) {
        para.push(lines[i]);
      }
      const p = el(tight ? "div" : "p", tight ? "li-text" : null);
      p.append(...renderInline(para.join("\n")));
      out.push(p);
    }
  }
  return out;
}

// The whole text as a fragment, ready to replace a container's children.
export function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  fragment.append(...renderBlocks(text));
  return fragment;
}
