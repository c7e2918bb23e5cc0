// Stand-ins for the parts of the WebUI page that javascript/loratorio.js relies on, written
// to behave like A1111 1.10 / Forge: script.js (gradioApp, onUiLoaded, onUiUpdate,
// onAfterUiUpdate driven by a MutationObserver), ui.js (updateInput), hints.js (the global
// `titles` map applied to label text), localization (`localization`), and the
// InputAccordion (a hidden gradio checkbox `<id>-checkbox`, a visible checkbox put into the
// header's first span, and `.label-wrap.open` while the accordion is open).

window.__pageErrors = [];
window.addEventListener('error', function(e) {
    window.__pageErrors.push(String(e.message || e));
});

var localization = {};

var titles = {
    "Sampling steps": "How many times to improve the generated image iteratively",
};

function gradioApp() {
    var app = document.querySelector('gradio-app');
    if (!app) {
        return document;
    }
    return app.shadowRoot || app;
}

var uiUpdateCallbacks = [];
var uiAfterUpdateCallbacks = [];
var uiLoadedCallbacks = [];

function onUiUpdate(callback) {
    uiUpdateCallbacks.push(callback);
}

function onAfterUiUpdate(callback) {
    uiAfterUpdateCallbacks.push(callback);
}

function onUiLoaded(callback) {
    uiLoadedCallbacks.push(callback);
}

function shimRunCallbacks(list, arg) {
    list.forEach(function(callback) {
        try {
            callback(arg);
        } catch (e) {
            window.__pageErrors.push('callback: ' + (e && e.stack ? e.stack : e));
        }
    });
}

function updateInput(target) {
    target.dispatchEvent(new Event('input', {bubbles: true}));
}

(function() {
    var loaded = false;
    var afterTimer = null;

    document.addEventListener('DOMContentLoaded', function() {
        new MutationObserver(function(records) {
            if (!loaded && gradioApp().querySelector('#txt2img_prompt')) {
                loaded = true;
                shimSetupAccordions();
                shimRunCallbacks(uiLoadedCallbacks);
            }
            shimRunCallbacks(uiUpdateCallbacks, records);
            clearTimeout(afterTimer);
            afterTimer = setTimeout(function() {
                shimRunCallbacks(uiAfterUpdateCallbacks);
                window.__afterUpdateRuns = (window.__afterUpdateRuns || 0) + 1;
                shimApplyHints();
            }, 200);
        }).observe(gradioApp(), {childList: true, subtree: true});
    });
})();

// gradio's accordion: clicking the header toggles `open` and shows/hides the content.
document.addEventListener('click', function(e) {
    var wrap = e.target.closest && e.target.closest('.label-wrap');
    if (!wrap) {
        return;
    }
    wrap.classList.toggle('open');
    var content = wrap.nextElementSibling;
    if (content) {
        content.style.display = wrap.classList.contains('open') ? 'block' : 'none';
    }
});

// The WebUI's InputAccordion behaviour: a visible checkbox in the header mirrors the
// hidden gradio checkbox; opening the accordion ticks it until the user uses the checkbox.
function shimSetupAccordions() {
    gradioApp().querySelectorAll('.input-accordion').forEach(function(acc) {
        var wrap = acc.querySelector('.label-wrap');
        var hidden = gradioApp().querySelector('#' + acc.id + '-checkbox input');
        var linked = true;
        var visible = document.createElement('input');
        visible.type = 'checkbox';
        visible.id = acc.id + '-visible-checkbox';
        visible.className = 'input-accordion-checkbox';
        visible.checked = wrap.classList.contains('open');
        wrap.querySelector('span').prepend(visible);

        function sync() {
            if (linked && wrap.classList.contains('open') !== visible.checked) {
                wrap.click();
            }
            hidden.checked = visible.checked;
            updateInput(hidden);
        }
        visible.addEventListener('click', function(e) {
            linked = false;
            e.stopPropagation();
        });
        visible.addEventListener('input', sync);
        new MutationObserver(function() {
            acc.classList.toggle('input-accordion-open', wrap.classList.contains('open'));
            if (linked) {
                visible.checked = wrap.classList.contains('open');
                sync();
            }
        }).observe(wrap, {attributes: true, attributeFilter: ['class']});
    });
}

// hints.js: a label whose text is a key of `titles` gets that entry as its tooltip.
function shimApplyHints() {
    gradioApp().querySelectorAll('span, button, p, label').forEach(function(el) {
        if (el.title) {
            return;
        }
        var text = el.textContent;
        var hint = localization[titles[text]] || titles[text];
        if (hint) {
            el.title = hint;
        }
    });
}

// A gradio multiselect dropdown shows each chosen value as a token.
function shimSetTokens(elemId, values) {
    var inner = gradioApp().querySelector('#' + elemId + ' .wrap-inner');
    inner.querySelectorAll('.token').forEach(function(t) {
        t.remove();
    });
    // gradio 3.41: the tokens come first, then the text input in its `.secondary-wrap`
    var input = inner.querySelector('.secondary-wrap') || inner.querySelector('input');
    values.forEach(function(v) {
        var token = document.createElement('div');
        token.className = 'token';
        var span = document.createElement('span');
        span.textContent = v;
        var remove = document.createElement('div');
        remove.className = 'token-remove';
        remove.textContent = '\u00d7';
        remove.addEventListener('click', function() {
            token.remove();
        });
        token.appendChild(span);
        token.appendChild(remove);
        inner.insertBefore(token, input);
    });
}
