// LoRAtorio front-end for the A1111 and Forge WebUIs.
//
// - Shows in the LoRAtorio accordion header which LoRAs will be composed as branches
//   (from the <lora:...> tags of the prompt, minus "Merge into base instead", plus the
//   candidate pool), updated while the prompt is typed. Tags that name no LoRA of the
//   LoRA list (the server puts the list into a hidden element) are marked and not counted.
// - Adds tooltips for every setting through the WebUI's `titles` hint map.
//
// The WebUI loads this file on every page, before the UI exists and also where the
// LoRAtorio controls are absent (another layout, a disabled script), so every lookup
// tolerates a missing element and nothing here may throw.

(function() {
    'use strict';

    var TABS = ['txt2img', 'img2img'];

    // Tag types the built-in Lora handles; it registers `lyco` as an alias of `lora`.
    var TAG_TYPES = ['lora', 'lyco'];

    // The WebUI finds extra-network tags with the Python regex `<(\w+):([^>]+)>` where `\w`
    // is Unicode-aware; `\p{L}\p{N}_` with the `u` flag matches the same characters, so
    // a tag that Python swallows into a longer match is not found here either.
    var TAG_PATTERN = (function() {
        try {
            return new RegExp('<([\\p{L}\\p{N}_]+):([^>]+)>', 'gu');
        } catch (e) {
            return /<(\w+):([^>]+)>/g;
        }
    })();

    var LABELS = {
        method: 'Composition method',
        recenter: 'Lambda (re-centring)',
        temperature_scale: 'Temperature scale',
        patch_size: 'Patch size',
        top_k: 'Top-k LoRAs per patch',
        probe_every: 'Probe every N steps',
        pool: 'Candidate pool',
        text_encoder_per_branch: 'Text encoder per branch',
        merge_into_base: 'Merge into base instead',
        composition_map: 'Show composition map',
        max_rows_per_call: 'Max rows per model call',
    };

    // With N composed LoRAs a step costs 2N + 2 model evaluations (base cond and uncond,
    // then one cond and one uncond per LoRA) against 2 for a plain generation.
    var HINTS = {
        'LoRAtorio': 'Compose the LoRAs named by <lora:...> tags patch by patch instead of merging them into ' +
            'the model: each LoRA runs as its own branch and acts where it differs most from the base model, ' +
            'so concepts stay apart instead of bleeding into each other or washing out. ' +
            'Costs about N + 1 times the time of a plain generation with N LoRAs.',
        'Composition method': 'How the LoRAs are fused. joint (default): resolve averaged with the model ' +
            'running every LoRA at once, which sees what the LoRAs do to each other (clothing on the ' +
            'character, not on a generic figure); one more row per step. resolve: every LoRA adds its own ' +
            'change to the base model\'s prediction; only where two LoRAs push the same spot opposite ways ' +
            'does the one that owns that patch keep its change. paper: the published LoRAtorio step (each ' +
            'patch shared by SoftMin weights that sum to one).',
        'Lambda (re-centring)': 'How far the negative (unconditional) prediction follows the LoRAs: 1 (default) = ' +
            'it carries the LoRAs\' own change, so guidance does not over-amplify them; lower = stronger ' +
            'concepts but burnt or black images at usual CFG scales; 0 = the base model alone. ' +
            'Speed: 0 skips every LoRA\'s negative pass, which saves N of the 2N + 2 model evaluations per ' +
            'step (3 LoRAs: 5 instead of 8).',
        'Temperature scale': 'How decisively each patch is handed to the LoRA that differs most from the base ' +
            'model (the hand-over sharpens with every step). Higher: cleaner separation of concepts, harder ' +
            'seams; lower: softer blending, more mixing. Default 10. No effect on speed.',
        'Patch size': 'Side of the regions, in latent pixels (8 image pixels each), that are given to one LoRA ' +
            'or another. Small (1-2, default 2): fine boundaries that follow details; large: coarser, blockier ' +
            'areas. Practically no effect on speed.',
        'Top-k LoRAs per patch': 'How many LoRAs may act in each patch: only the k that differ most ' +
            'from the base model keep a weight. 1 = every patch belongs to a single LoRA (sharpest separation); ' +
            '0 = all LoRAs blend (default). Saves time only together with "Probe every N steps" above 1.',
        'Probe every N steps': 'Evaluate every candidate LoRA only on every N-th step; in between, only the ' +
            'top-k winners of the last probe run. 1 = every LoRA every step (default, best quality). ' +
            'With top-k set, 2-4 removes most of the cost of the losing LoRAs, at a small risk of missing one ' +
            'that would win later. No effect while top-k is 0.',
        'Candidate pool': 'More LoRAs that join the composition without a tag in the prompt; top-k decides per ' +
            'patch and step which of them act. Each one costs like one more tagged LoRA, unless top-k and ' +
            '"Probe every N steps" above 1 keep the losers idle between probes.',
        'Text encoder per branch': 'Encode the prompt once per LoRA with that LoRA\'s text-encoder part, as it ' +
            'was trained: better likeness for character and style LoRAs (default on). Off: every branch uses ' +
            'the base model\'s prompt encoding; slightly faster start, weaker LoRAs that trained the text ' +
            'encoder.',
        'Merge into base instead': 'LoRAs named in the prompt that are merged into the model the usual way and ' +
            'so apply everywhere, to every branch: for global style, quality or detail LoRAs. They add no ' +
            'branch and no extra time.',
        'Show composition map': 'Add one extra image per result that colours each area by the LoRA that acted ' +
            'there (averaged over the steps), with a legend. The generated image itself is unchanged; costs ' +
            'a little time and memory.',
        'Max rows per model call': 'The LoRA branches of a step run together in one extra model ' +
            'call. If that runs out of VRAM, cap the batch rows per call (e.g. 2-4): same image, slower. ' +
            '0 = no limit: all in one call (fastest, default).',
    };

    function root() {
        try {
            if (typeof gradioApp === 'function') {
                return gradioApp() || document;
            }
        } catch (e) {
            // gradioApp() before the app element exists: fall back to the document
        }
        return document;
    }

    function find(selector) {
        try {
            return root().querySelector(selector) || document.querySelector(selector);
        } catch (e) {
            return null;
        }
    }

    // -- tag parsing (mirrors modules/extra_networks.py and the built-in Lora) ------------

    function splitItem(item) {
        // ExtraNetworkParams: `item.split('=', 2)` is named only with exactly two parts.
        var parts = item.split('=');
        return parts.length === 2 ? parts : null;
    }

    // Python's float() and int() on a string: surrounding whitespace, a sign, digits with
    // single underscores between them; float() also takes a fraction, an exponent, inf, nan.
    var PY_DIGITS = '\\d(?:_?\\d)*';
    var PY_FLOAT = new RegExp('^[+-]?(?:(?:' + PY_DIGITS + ')(?:\\.(?:' + PY_DIGITS + ')?)?|\\.' + PY_DIGITS + ')' +
        '(?:e[+-]?' + PY_DIGITS + ')?$');
    var PY_INT = new RegExp('^[+-]?' + PY_DIGITS + '$');

    function pyFloat(text) {
        var t = String(text).trim().toLowerCase();
        var special = /^([+-]?)(inf|infinity|nan)$/.exec(t);
        if (special) {
            return special[2] === 'nan' ? NaN : special[1] === '-' ? -Infinity : Infinity;
        }
        return PY_FLOAT.test(t) ? Number(t.replace(/_/g, '')) : NaN;
    }

    function pyInt(text) {
        var t = String(text).trim();
        return PY_INT.test(t) ? parseInt(t.replace(/_/g, ''), 10) : NaN;
    }

    /** Every extra-network tag of a prompt: {type, items, positional, named, text, index}. */
    function parseTags(prompt) {
        var out = [];
        if (typeof prompt !== 'string' || prompt === '') {
            return out;
        }
        var re = new RegExp(TAG_PATTERN.source, TAG_PATTERN.flags);
        var m;
        while ((m = re.exec(prompt)) !== null) {
            var items = m[2].split(':');
            var positional = [];
            var named = Object.create(null);
            for (var i = 0; i < items.length; i++) {
                var kv = splitItem(items[i]);
                if (kv) {
                    named[kv[0]] = kv[1];
                } else {
                    positional.push(items[i]);
                }
            }
            out.push({type: m[1], items: items, positional: positional, named: named, text: m[0], index: m.index});
        }
        return out;
    }

    function invalidate(tag, reason) {
        if (tag.valid) {
            tag.valid = false;
            tag.reason = reason;
        }
    }

    /**
     * The LoRA tags of a prompt with the multipliers the built-in Lora reads:
     * te = 2nd positional or te=, default 1; unet = 3rd positional or unet=, default te;
     * dyn = 4th positional or dyn=. A tag without a name or with a multiplier that is not
     * a finite number is marked invalid with the reason (LoRAtorio skips it).
     */
    function loraTags(prompt) {
        var out = [];
        var tags = parseTags(prompt);
        for (var i = 0; i < tags.length; i++) {
            var t = tags[i];
            if (TAG_TYPES.indexOf(t.type) < 0) {
                continue;
            }
            var p = t.positional;
            var tag = {name: p.length ? p[0] : '', te: 1.0, unet: 1.0, dyn: null, text: t.text, valid: true, reason: ''};
            if (!tag.name) {
                invalidate(tag, 'no LoRA name');
            }
            var te = p.length > 1 ? p[1] : null;
            te = 'te' in t.named ? t.named.te : te;
            if (te !== null) {
                tag.te = pyFloat(te);
                if (!isFinite(tag.te)) {
                    invalidate(tag, 'text-encoder multiplier "' + te + '" is not a number');
                }
            }
            var unet = p.length > 2 ? p[2] : null;
            unet = 'unet' in t.named ? t.named.unet : unet;
            if (unet !== null) {
                tag.unet = pyFloat(unet);
                if (!isFinite(tag.unet)) {
                    invalidate(tag, 'UNet multiplier "' + unet + '" is not a number');
                }
            } else {
                tag.unet = tag.te;
            }
            var dyn = p.length > 3 ? p[3] : null;
            dyn = 'dyn' in t.named ? t.named.dyn : dyn;
            if (dyn !== null) {
                tag.dyn = pyInt(dyn);
                if (isNaN(tag.dyn)) {
                    invalidate(tag, 'rank limit "' + dyn + '" is not a number');
                }
            }
            out.push(tag);
        }
        return out;
    }

    // -- reading the UI -------------------------------------------------------------------

    function promptText(tab) {
        var area = find('#' + tab + '_prompt textarea');
        return area && typeof area.value === 'string' ? area.value : '';
    }

    function isEnabled(tab) {
        var id = 'loratorio_' + tab;
        // The InputAccordion's hidden gradio checkbox carries the value that is submitted.
        var box = find('#' + id + '-checkbox input[type="checkbox"]') || find('#' + id + '-visible-checkbox');
        if (box) {
            return !!box.checked;
        }
        var wrap = find('#' + id + ' .label-wrap');
        return !!(wrap && wrap.classList.contains('open'));
    }

    /** Values selected in a gradio multiselect dropdown (its tokens), [] if unreadable. */
    function multiselectValues(elemId) {
        var el = find('#' + elemId);
        if (!el) {
            return [];
        }
        var out = [];
        var tokens = el.querySelectorAll('.token > span, .token span:first-child');
        for (var i = 0; i < tokens.length; i++) {
            var v = (tokens[i].textContent || '').trim();
            if (v && out.indexOf(v) < 0) {
                out.push(v);
            }
        }
        return out;
    }

    // The names a tag may use (file names and aliases), as a JSON list in a data attribute
    // of a hidden element the server renders and refreshes; parsed again only when it changes.
    var KNOWN_ATTR = 'data-loratorio-loras';
    var knownCache = {};

    /** The set of LoRA names the WebUI knows for a tab, or null where the page has no list. */
    function knownLoras(tab) {
        var el = find('#loratorio_' + tab + '_known_loras [' + KNOWN_ATTR + ']');
        if (!el) {
            return null;
        }
        var raw = el.getAttribute(KNOWN_ATTR);
        var cached = knownCache[tab];
        if (cached && cached.raw === raw) {
            return cached.names;
        }
        var names = null;
        try {
            var list = JSON.parse(raw);
            if (Array.isArray(list)) {
                names = Object.create(null);
                list.forEach(function(n) {
                    names[n] = true;
                });
            }
        } catch (e) {
            names = null;
        }
        knownCache[tab] = {raw: raw, names: names};
        return names;
    }

    /**
     * What LoRAtorio would compose for a tab: tagged LoRAs (first occurrence wins) that the
     * LoRA list knows and that are not listed under "Merge into base instead", then pool
     * LoRAs not already tagged. Tags of unknown names are skipped by the server too.
     */
    function tabState(tab) {
        var all = loraTags(promptText(tab));
        var mergeSel = multiselectValues('loratorio_' + tab + '_merge_into_base');
        var poolSel = multiselectValues('loratorio_' + tab + '_pool');
        var known = knownLoras(tab);
        // the first valid tag of a name counts, as on the server
        var tags = [];
        all.forEach(function(t) {
            if (t.valid && !tags.some(function(u) {
                return u.name === t.name;
            })) {
                tags.push(t);
            }
        });
        var invalid = all.filter(function(t) {
            return !t.valid;
        });
        var tagged = tags.map(function(t) {
            return t.name;
        });
        var unknown = tagged.filter(function(n) {
            return known !== null && !known[n];
        });
        var found = tagged.filter(function(n) {
            return unknown.indexOf(n) < 0;
        });
        var names = found.filter(function(n) {
            return mergeSel.indexOf(n) < 0;
        });
        var merged = found.filter(function(n) {
            return mergeSel.indexOf(n) >= 0;
        });
        var pool = poolSel.filter(function(n) {
            return names.indexOf(n) < 0 && mergeSel.indexOf(n) < 0;
        });
        return {
            tab: tab,
            enabled: isEnabled(tab),
            tags: tags,
            names: names,
            pool: pool,
            merged: merged,
            unknown: unknown,
            invalid: invalid,
            count: names.length + pool.length,
        };
    }

    // -- the header summary ---------------------------------------------------------------

    function plural(n) {
        return n === 1 ? '1 LoRA' : n + ' LoRAs';
    }

    function fmt(x) {
        return isNaN(x) ? '?' : String(Math.round(x * 1000) / 1000);
    }

    function summaryParts(st) {
        var list = st.names.join(', ');
        if (st.pool.length) {
            list += (list ? ' + ' : '') + 'pool: ' + st.pool.join(', ');
        }
        var note = '';
        if (st.count === 0) {
            var tagged = st.merged.length + st.unknown.length + st.invalid.length > 0;
            note = tagged ? 'nothing to compose: plain generation' : 'no <lora:...> tags: plain generation';
        } else if (st.count === 1) {
            note = 'composition needs 2 or more';
        }
        return {
            count: plural(st.count) + (st.count ? ':' : ''),
            list: list,
            note: note,
            merged: st.merged.length ? 'merged: ' + st.merged.join(', ') : '',
            unknown: st.unknown.length ? 'not found: ' + st.unknown.join(', ') : '',
            skipped: st.invalid.length ? 'skipped: ' + st.invalid.map(function(t) {
                return t.text;
            }).join(' ') : '',
        };
    }

    function summaryTitle(st) {
        var lines = [];
        if (st.count === 0) {
            lines.push('No LoRA to compose: the image is generated as without LoRAtorio.');
        } else {
            lines.push('LoRAtorio composes ' + plural(st.count) + ' as separate branches:');
            st.tags.forEach(function(t) {
                if (st.names.indexOf(t.name) >= 0) {
                    lines.push('  ' + t.name + ' (unet ' + fmt(t.unet) + ', te ' + fmt(t.te) + ')');
                }
            });
            st.pool.forEach(function(n) {
                lines.push('  ' + n + ' (candidate pool)');
            });
            if (st.count === 1) {
                lines.push('With a single LoRA there is nothing to compose against; add another tag.');
            }
        }
        if (st.merged.length) {
            lines.push('Merged into the base model for every branch: ' + st.merged.join(', '));
        }
        if (st.unknown.length) {
            lines.push('Not found in the LoRA list, skipped: ' + st.unknown.join(', '));
        }
        st.invalid.forEach(function(t) {
            lines.push('Skipped ' + t.text + ': ' + t.reason);
        });
        lines.push('From the prompt as typed; when a batch has several prompts, the first one\'s tags count. ' +
            'A file that cannot be loaded is skipped when generating; the report under the image says why.');
        return lines.join('\n');
    }

    var SUMMARY_PARTS = ['count', 'list', 'note', 'merged', 'unknown', 'skipped'];

    var UNKNOWN_HINT = 'Not in the LoRA list: LoRAtorio skips these tags. Check the spelling; after adding a ' +
        'file, press the refresh button next to "Merge into base instead".';

    function ensureSummary(tab) {
        var acc = find('#loratorio_' + tab);
        if (!acc) {
            return null;
        }
        var id = 'loratorio_' + tab + '_summary';
        var existing = acc.querySelector('#' + id);
        if (existing) {
            return existing;
        }
        var wrap = acc.querySelector('.label-wrap');
        if (!wrap) {
            return null;
        }
        var span = document.createElement('span');
        span.id = id;
        span.className = 'loratorio-summary';
        span.hidden = true;
        SUMMARY_PARTS.forEach(function(part) {
            var s = document.createElement('span');
            s.className = 'loratorio-summary-' + part;
            if (part === 'unknown') {
                s.title = UNKNOWN_HINT;
            }
            span.appendChild(s);
        });
        // Stay after the label span (the WebUI puts its checkbox into the first span) and
        // before the open/close icon, which is the last child.
        var icon = wrap.querySelector(':scope > .icon');
        if (!icon && wrap.children.length > 1) {
            icon = wrap.lastElementChild;
        }
        wrap.insertBefore(span, icon || null);
        return span;
    }

    function setText(el, text) {
        // Writing only on change keeps the WebUI's DOM observer from looping on our updates.
        if (el && el.textContent !== text) {
            el.textContent = text;
        }
    }

    function setAttr(el, name, value) {
        if (el && el.getAttribute(name) !== value) {
            el.setAttribute(name, value);
        }
    }

    function renderTab(tab) {
        var span = ensureSummary(tab);
        if (!span) {
            return null;
        }
        var st = tabState(tab);
        if (!st.enabled) {
            if (!span.hidden) {
                span.hidden = true;
            }
            setAttr(span, 'data-state', 'off');
            return st;
        }
        var parts = summaryParts(st);
        setText(span.querySelector('.loratorio-summary-count'), parts.count);
        setText(span.querySelector('.loratorio-summary-list'), parts.list);
        setText(span.querySelector('.loratorio-summary-note'), parts.note);
        setText(span.querySelector('.loratorio-summary-merged'), parts.merged);
        setText(span.querySelector('.loratorio-summary-unknown'), parts.unknown);
        setText(span.querySelector('.loratorio-summary-skipped'), parts.skipped);
        setAttr(span, 'data-count', String(st.count));
        setAttr(span, 'data-state', st.count === 0 ? 'none' : st.count === 1 ? 'single' : 'compose');
        setAttr(span, 'title', summaryTitle(st));
        if (span.hidden) {
            span.hidden = false;
        }
        return st;
    }

    function refresh() {
        var out = {};
        TABS.forEach(function(tab) {
            try {
                out[tab] = renderTab(tab);
            } catch (e) {
                out[tab] = null;
                if (window.console) {
                    console.error('LoRAtorio: updating the ' + tab + ' header failed', e);
                }
            }
        });
        return out;
    }

    // -- tooltips -------------------------------------------------------------------------

    function registerHints() {
        // Entries go into the WebUI's global map keyed by label text; a label another
        // extension already describes keeps its entry there, and our own controls get
        // their title set directly below.
        try {
            if (typeof titles === 'object' && titles !== null) {
                Object.keys(HINTS).forEach(function(label) {
                    if (!(label in titles)) {
                        titles[label] = HINTS[label];
                    }
                });
            }
        } catch (e) {
            // no hint map on this page
        }
    }

    function applyTitles() {
        TABS.forEach(function(tab) {
            Object.keys(LABELS).forEach(function(key) {
                var el = find('#loratorio_' + tab + '_' + key);
                if (!el) {
                    return;
                }
                var label = LABELS[key];
                var hint = HINTS[label];
                if (!el.title) {
                    el.title = hint;
                }
                var spans = el.querySelectorAll('span, label');
                for (var i = 0; i < spans.length; i++) {
                    if (!spans[i].title && (spans[i].textContent || '').trim() === label) {
                        spans[i].title = hint;
                    }
                }
            });
            var head = find('#loratorio_' + tab + ' .label-wrap > span:first-child');
            if (head && !head.title) {
                head.title = HINTS.LoRAtorio;
            }
        });
    }

    // -- wiring ---------------------------------------------------------------------------

    var pending = null;

    function schedule() {
        if (pending === null) {
            pending = setTimeout(function() {
                pending = null;
                refresh();
                applyTitles();
            }, 0);
        }
    }

    function relevant(target) {
        if (!target || typeof target.closest !== 'function') {
            return false;
        }
        for (var i = 0; i < TABS.length; i++) {
            var t = TABS[i];
            if (target.closest('#' + t + '_prompt, #loratorio_' + t + ', #loratorio_' + t + '-checkbox')) {
                return true;
            }
        }
        return false;
    }

    var boundRoots = [];

    function bind() {
        var r = root();
        if (boundRoots.indexOf(r) >= 0) {
            return;
        }
        boundRoots.push(r);
        ['input', 'change', 'click', 'keyup'].forEach(function(type) {
            r.addEventListener(type, function(event) {
                if (relevant(event.target)) {
                    if (type === 'input') {
                        refresh();
                    } else {
                        schedule();
                    }
                }
            }, true);
        });
    }

    function onLoaded() {
        registerHints();
        bind();
        refresh();
        applyTitles();
    }

    registerHints();
    if (typeof onUiLoaded === 'function') {
        onUiLoaded(onLoaded);
    } else {
        document.addEventListener('DOMContentLoaded', onLoaded);
    }
    // Values set by the UI itself (pasted infotext, an extra-networks card click, a
    // multiselect token) come without a user event here; the UI's DOM updates catch them.
    var afterUpdate = typeof onAfterUiUpdate === 'function' ? onAfterUiUpdate :
        typeof onUiUpdate === 'function' ? onUiUpdate : null;
    if (afterUpdate) {
        afterUpdate(function() {
            bind();
            schedule();
        });
    }

    window.loratorio = {
        parseTags: parseTags,
        loraTags: loraTags,
        state: tabState,
        refresh: refresh,
        hints: HINTS,
        labels: LABELS,
    };
})();
