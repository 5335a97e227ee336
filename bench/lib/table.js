// @ts-check
/** Text and Markdown tables for the benchmark reports. */

/**
 * Renders rows of cells as an aligned text table or as Markdown.
 * @param {string[]} head @param {string[][]} rows @param {boolean} markdown @param {number} [leftColumns]
 */
export function renderTable(head, rows, markdown, leftColumns = 1) {
  if (markdown) {
    const line = (/** @type {string[]} */ cells) => `| ${cells.join(' | ')} |`;
    return [line(head), line(head.map((_, i) => (i < leftColumns ? '---' : '---:'))), ...rows.map(line)].join('\n');
  }
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const pad = (/** @type {string[]} */ cells) => cells.map((c, i) => (i < leftColumns ? c.padEnd(widths[i] ?? 0) : c.padStart(widths[i] ?? 0))).join('  ');
  return [pad(head), widths.map((w) => '-'.repeat(w)).join('  '), ...rows.map(pad)].join('\n');
}
